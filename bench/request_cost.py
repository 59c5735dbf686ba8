"""The worst-case time of one request at the export's default limits.

Exports a descriptor model (random weights: time does not depend on them) with the default
ExportConfig and times, after one untimed call of each signature at a small size (graph
set-up), the two requests that the limits allow to cost the most:
  - global_descriptor_from_bytes with max_images_per_request square JPEGs of
    max_image_size px (each described at the default scales);
  - serving_default on one square max_image_size image with max_scales_per_request scales
    of the largest size whose pixels together stay within max_batch_pixels.
Prints the machine (CPU, instruction-set level, load) with the times.

  python bench/request_cost.py                 # resnet101, global+local, 1024 px
  python bench/request_cost.py --backbone=resnet50
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (this folder)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from glam_tf.config import ExportConfig, contract  # noqa: E402
from glam_tf.export import serving  # noqa: E402
from glam_tf.model import ModelConfig, build_descriptor_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("backbone", "resnet101", ("resnet50", "resnet101"), "Backbone.")


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    print(harness.header(), flush=True)
    limits = ExportConfig()
    size = limits.max_image_size
    model = build_descriptor_model(ModelConfig(backbone=FLAGS.backbone, weights="none",
                                               variant="global+local"))
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
    small = tf.io.encode_jpeg(image[:64, :64], quality=90).numpy()
    # The largest scale at which max_scales_per_request copies fit max_batch_pixels.
    n = limits.max_scales_per_request
    scale = float(np.floor(np.sqrt(limits.max_batch_pixels / n) / size * 1000) / 1000)
    with tempfile.TemporaryDirectory() as tmp:
        sig = tf.saved_model.load(serving.export_saved_model(model, tmp)).signatures
        sig["global_descriptor_from_bytes"](image_bytes=tf.constant([small]))
        sig["serving_default"](input_image=image[:64, :64], input_scales=tf.constant([1.0]),
                               input_global_scales_ind=tf.constant([0]))
        k = limits.max_images_per_request
        from_bytes_s = _timed(lambda: sig["global_descriptor_from_bytes"](
            image_bytes=tf.constant([jpeg] * k)))
        one_s = _timed(lambda: sig["global_descriptor_from_bytes"](
            image_bytes=tf.constant([jpeg])))
        scales_s = _timed(lambda: sig["serving_default"](
            input_image=image, input_scales=tf.constant([scale] * n),
            input_global_scales_ind=tf.constant(list(range(n)))))
    mp = k * sum((size * s) ** 2 for s in contract.DEFAULT_SCALES) / 1e6
    print(f"{FLAGS.backbone} / global+local, TF {tf.__version__}; at the end {harness.header()}")
    print(f"global_descriptor_from_bytes, {k} JPEGs of {size}x{size} at scales "
          f"{contract.DEFAULT_SCALES} ({mp:.1f} MP): {from_bytes_s:.1f} s "
          f"(1 JPEG: {one_s:.1f} s)")
    print(f"serving_default, {n} scales of {scale} on {size}x{size} "
          f"({n * (size * scale) ** 2 / 1e6:.1f} MP): {scales_s:.1f} s")


if __name__ == "__main__":
    app.run(main)
