"""The demo's data: synthetic landmarks generated when absent, converted to TFRecords.

Generation (glam_tf.data.synthetic.generate_if_absent) and conversion
(glam_tf.data.gldv2.convert_gldv2) are both idempotent, so a rerun of the demo reuses
them; the test split (`<root>/synth`, dataset name "synth") is what --eval_dataset=synth
--eval_root=<root> evaluates on.
"""

from __future__ import annotations


from absl import logging

from glam_tf import files
from glam_tf.data import gldv2, synthetic
from glam_tf.config import SyntheticConfig, contract

TFRECORD_SUBDIR = "tfrecord"


def prepare_synthetic(config: SyntheticConfig, *, num_workers: int = 1,
                      beam_args=None) -> str:
    """Generates (if absent) and converts (if not done) the synthetic set; returns the glob.

    Args:
        config: sizes of the set and its root folder.
        num_workers: processes rendering the images (1: in this process; spawned workers
            re-import the main module, TensorFlow included, which costs more than they
            save on small sets).
        beam_args: Beam flags of the conversion pipeline (None: the DirectRunner default).

    Returns:
        The TFRecord glob of the training split (`<root>/tfrecord/train-*-of-*.tfrecord`).
    """
    summary = synthetic.generate_if_absent(config, num_workers=num_workers,
                                           show_progress=False)
    output_dir = files.join(config.root, TFRECORD_SUBDIR)
    summary_path = files.join(output_dir, contract.CONVERTER_SUMMARY_FILE)
    if files.isfile(summary_path):
        done = gldv2.read_summary(output_dir)
        if done.written.get("train") == summary.train_images:
            logging.info("Synthetic TFRecords already in %s", output_dir)
            return done.train_pattern
    converted = gldv2.convert_gldv2(config.root, output_dir, num_shards=2,
                                    seed=config.seed, beam_args=beam_args)
    logging.info("Converted %d synthetic training images of %d classes to %s",
                 converted.written["train"], converted.num_classes, output_dir)
    return converted.train_pattern
