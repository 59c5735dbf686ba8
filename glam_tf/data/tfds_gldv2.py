"""tensorflow-datasets builder `glam_gldv2`: GLDv2 training images from a manual download.

For users who work through `tfds` (`tfds build`, `tfds.load`). Training in this project reads
the DELG-keyed shards of `build_gldv2_main.py` instead, which writes in parallel, resumes after
an interruption and lists missing / undecodable files; this builder writes through tfds's
single-process generator and starts over if interrupted. Both relabel landmarks the same way
(present landmarks in increasing landmark-id order -> 0..N-1) and keep the original bytes.

  import glam_tf.data.tfds_gldv2  # registers the builder
  builder = tfds.builder("glam_gldv2", data_dir=...)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/data/gldv2"))
  ds = builder.as_dataset(split="train")  # {"image", "id", "label", "landmark_id"}
"""

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from glam_tf.data import gldv2, records

_CITATION = """\
@inproceedings{weyand2020gldv2,
  title={Google Landmarks Dataset v2 -- A Large-Scale Benchmark for Instance-Level
         Recognition and Retrieval},
  author={Weyand, T. and Araujo, A. and Cao, B. and Sim, J.},
  booktitle={CVPR}, year={2020}}
"""


class GlamGldv2(tfds.core.GeneratorBasedBuilder):
    """GLDv2 training set (train_clean.csv or train.csv) as downloaded, labels 0..N-1."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: train split, original image bytes."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download Google Landmarks v2 from https://github.com/cvdfoundation/google-landmark "
        "and put in the manual directory (default ~/tensorflow_datasets/downloads/manual/, or "
        "DownloadConfig(manual_dir=...)):\n"
        "  train_clean.csv  (columns landmark_id,images) or train.csv (id,url,landmark_id)\n"
        "  train/<a>/<b>/<c>/<id>.jpg   (extract the images_000.tar ... images_499.tar files "
        "into train/; a, b, c are the first three characters of the id)\n"
        "Missing and undecodable images are skipped with a warning.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Google Landmarks Dataset v2, training images with relabelled classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "id": tfds.features.Text(),
                "label": tfds.features.Scalar(
                    np.int64, doc="class 0..N-1: landmarks with a present image, in "
                                  "increasing landmark_id order"),
                "landmark_id": tfds.features.Scalar(np.int64, doc="original GLDv2 landmark"),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/cvdfoundation/google-landmark",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        csv_path = gldv2.find_gldv2_csv(str(root))
        # The layout is gldv2's (train_image_dir, gldv2_image_path), spelled with the
        # manual_dir path object: tfds' builder tests forbid `os` inside a builder.
        image_dir = root / gldv2.IMAGE_DIR_NAME
        if not image_dir.exists():
            raise FileNotFoundError(
                f"GLDv2 image folder {image_dir} does not exist.\n"
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        images = gldv2.read_gldv2_csv(csv_path)
        present = []
        for im in images:
            path = image_dir / im.image_id[0] / im.image_id[1] / im.image_id[2] / (
                im.image_id + ".jpg")
            if path.exists():
                present.append((im, path))
        if len(present) < len(images):
            logging.warning("glam_gldv2: %d of %d images listed in %s are missing",
                            len(images) - len(present), len(images), csv_path)
        label_map = gldv2.build_label_map(im.landmark_id for im, _ in present)
        return {"train": self._generate_examples(present, label_map)}

    def _generate_examples(self, present, label_map):
        for im, path in present:
            data = path.read_bytes()
            try:
                records.probe_image(data)
            except records.UndecodableImageError as e:
                logging.warning("glam_gldv2: skipping undecodable %s (%s)", im.image_id, e)
                continue
            yield im.image_id, {
                "image": data,
                "id": im.image_id,
                "label": label_map[im.landmark_id],
                "landmark_id": im.landmark_id,
            }
