"""Latency of each exported signature at 1024 px, and batched vs one-at-a-time throughput.

Exports a descriptor model (random weights: speed does not depend on them) into a temporary
folder, loads it back with tf.saved_model.load and times, in one process:
  - serving_default (DELG interface, 3 scales), global_descriptor, global_descriptor_from_bytes
    (JPEG decode included) on one image whose longer side is --image_size;
  - the model alone at the same 3 sizes through a tf.function (what the signatures add);
  - batched_global_descriptors on --batch_size such images vs global_descriptor one by one.
Timed through bench/harness.py: the first call of each (graph optimisation) is reported
apart, --warmup more untimed rounds follow, then --reps timed rounds call every case once,
the order rotated each round (so neither the load from other processes nor a warm cache
favours a case). Wall-clock and process CPU time medians are reported, with the spread of
the per-round ratios and the machine (CPU, instruction-set level, load).

  python bench/export_latency.py                          # resnet101, weights none
  python bench/export_latency.py --backbone=resnet50 --reps=2
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
from absl import app, flags, logging  # noqa: E402

from glam_tf.config import contract  # noqa: E402
from glam_tf.export import serving  # noqa: E402
from glam_tf.model import BACKBONES, VARIANTS, ModelConfig, build_descriptor_model  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """This program's flags (defined when it runs, so bench/export_precision.py can import
    the timing helpers below without them)."""
    flags.DEFINE_enum("backbone", "resnet101", BACKBONES, "Backbone of the exported model.")
    flags.DEFINE_enum("variant", "global+local", VARIANTS, "GLAM variant.")
    flags.DEFINE_integer("image_size", 1024, "Longer side of the test image (px); also the "
                         "export's max_image_size.")
    flags.DEFINE_float("aspect", 0.75, "Shorter / longer side of the test image.")
    flags.DEFINE_integer("batch_size", 4, "Images per batched_global_descriptors call.")
    flags.DEFINE_integer("reps", 3, "Timed rounds (median reported).")
    flags.DEFINE_integer("warmup", 0, "Untimed rounds after the first calls.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.reps < 1 or FLAGS.batch_size < 1 or FLAGS.warmup < 0:
        raise app.UsageError("--reps and --batch_size must be >= 1, --warmup >= 0.")
    print(harness.header(), flush=True)
    if not 0 < FLAGS.aspect <= 1:
        raise app.UsageError(f"--aspect must be in (0, 1]; received {FLAGS.aspect}.")
    long_side = FLAGS.image_size
    short_side = int(round(long_side * FLAGS.aspect))
    config = ModelConfig(backbone=FLAGS.backbone, weights="none", variant=FLAGS.variant)
    logging.info("Building %s / %s", config.backbone, config.variant)
    model = build_descriptor_model(config)

    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (short_side, long_side, 3), dtype=np.uint8)
    batch = rng.randint(0, 256, (FLAGS.batch_size, short_side, long_side, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(image, quality=90)
    scales = tf.constant(contract.DEFAULT_SCALES, tf.float32)
    sizes = [(int(round(short_side * s)), int(round(long_side * s)))
             for s in contract.DEFAULT_SCALES]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = serving.export_saved_model(model, tmp, max_image_size=long_side)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = tf.saved_model.load(path)
        load_s = time.perf_counter() - start
        sig = loaded.signatures

        model_fn = tf.function(lambda x: model(x, training=False), jit_compile=False,
                               reduce_retracing=False)
        resized = [tf.image.resize(tf.cast(image[None], tf.float32), hw) for hw in sizes]
        for x in resized:       # trace each size once, outside the timing
            model_fn(x)

        b = FLAGS.batch_size
        cases = {
            "model alone, 3 sizes (tf.function)": lambda: [model_fn(x) for x in resized],
            "serving_default (3 scales)": lambda: sig["serving_default"](
                input_image=image, input_scales=scales,
                input_global_scales_ind=tf.constant([0, 1, 2])),
            "global_descriptor": lambda: sig["global_descriptor"](input_image=image),
            "global_descriptor_from_bytes (JPEG)": lambda: sig[
                "global_descriptor_from_bytes"](image_bytes=tf.reshape(jpeg, [1])),
            f"batched_global_descriptors, B={b}": lambda: sig["batched_global_descriptors"](
                input_images=batch),
            f"global_descriptor x {b}, one at a time": lambda: [
                sig["global_descriptor"](input_image=im) for im in batch],
        }
        results = harness.compare(cases, rounds=FLAGS.reps, warmup=1 + FLAGS.warmup,
                                  log=logging.info)

    print(f"\n{config.backbone} / {config.variant}, image {short_side}x{long_side}, scales "
          f"{contract.DEFAULT_SCALES}, TF {tf.__version__}; at the end {harness.header()}")
    print(f"export {export_s:.1f} s, load {load_s:.1f} s, {FLAGS.reps} timed rounds")
    print(f"{'call':<44}{'first s':>9}{'median s':>10}{'CPU s':>8}")
    for name, t in results.items():
        print(f"{name:<44}{t.first:>9.2f}{t.median:>10.2f}{t.cpu_median:>8.2f}")
    batched = results[f"batched_global_descriptors, B={b}"]
    single = results[f"global_descriptor x {b}, one at a time"]
    print(f"\nimages/s: batched {b / batched.median:.3f}, one at a time "
          f"{b / single.median:.3f} -> batched is {harness.ratio(single, batched)} faster")
    print(f"serving_default / model alone: "
          f"{harness.ratio(results['serving_default (3 scales)'], results['model alone, 3 sizes (tf.function)'])}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
