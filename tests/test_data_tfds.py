"""The tfds builder `glam_gldv2`, through tfds' own DatasetBuilderTestCase on fake data."""

import io
import os
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

# tfds.testing imports dill, which tensorflow-datasets does not declare.
pytest.importorskip("dill", reason="tfds.testing needs dill (requirements.txt: dill)")

from glam_tf.data import gldv2, tfds_gldv2

# Fake manual download: 3 landmarks, 5 good images (RGB and grey), 1 missing, 1 undecodable.
_LANDMARKS = {"0a1b2c3d4e5f6071": 50, "1a1b2c3d4e5f6071": 50, "2a1b2c3d4e5f6071": 7,
              "3a1b2c3d4e5f6071": 7, "4a1b2c3d4e5f6071": 9000}
_MISSING, _BROKEN = "5a1b2c3d4e5f6071", "6a1b2c3d4e5f6071"


def _make_manual_dir(root):
    for k, image_id in enumerate(_LANDMARKS):
        path = gldv2.gldv2_image_path(os.path.join(root, "train"), image_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = np.random.default_rng(k).integers(0, 255, (20 + k, 30, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if k % 2 else "RGB")
        buf = io.BytesIO()
        image.save(buf, "JPEG")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    broken = gldv2.gldv2_image_path(os.path.join(root, "train"), _BROKEN)
    os.makedirs(os.path.dirname(broken), exist_ok=True)
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8\xff truncated")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("id,url,landmark_id\n")
        for image_id, landmark in {**_LANDMARKS, _MISSING: 7, _BROKEN: 50}.items():
            f.write(f"{image_id},https://example.com/{image_id}.jpg,{landmark}\n")


class GlamGldv2Test(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = tfds_gldv2.GlamGldv2
    SPLITS = {"train": 5}
    SKIP_CHECKSUMS = True

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        _make_manual_dir(cls._tmp.name)
        cls.EXAMPLE_DIR = cls._tmp.name
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls._tmp.cleanup()

    def test_labels_follow_landmark_order(self):
        builder = self._make_builder()
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=self.EXAMPLE_DIR))
        got = {ex["id"].decode(): (int(ex["label"]), int(ex["landmark_id"]), ex["image"].shape)
               for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
        assert sorted(got) == sorted(_LANDMARKS)
        order = {7: 0, 50: 1, 9000: 2}
        for image_id, (label, landmark, shape) in got.items():
            assert landmark == _LANDMARKS[image_id] and label == order[landmark]
            assert shape[-1] == 3
