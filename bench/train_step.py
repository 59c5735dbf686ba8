"""Training-step time of GLAM vs the baseline (same backbone, batch and images), one process.

    python bench/train_step.py                       # ResNet101, 224x224, batch 8
    python bench/train_step.py --backbone=resnet50 --image_size=128 --batch_size=16
    python bench/train_step.py --precision=mixed_float16     # loss-scaled, as training

Each variant: build the model, ArcFace head and SGD inside the default strategy, trace the
real training step (glam_tf.train.step.make_train_step) on one warm-up step, then time
--steps steps on the "random" stand-in data (same batches for every variant). Prints the
median seconds per step, images/s, and the ratio of each variant to the baseline.
The variants are timed through bench/harness.py: one untimed call of --steps steps each
after the trace, then --rounds rounds with the order rotated, so that neither a change in
machine load nor a warm cache favours one; the per-round spread and the machine (CPU,
instruction-set level, load) are printed. The optimizer is training's (glam_tf.train.loop.make_optimizer:
SGD, wrapped in a LossScaleOptimizer under mixed_float16). The last line is
`JSON {...}` with every figure (bench/device_check.sh reads it).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (this folder)

flags.DEFINE_enum("backbone", "resnet101", ["resnet50", "resnet101", "resnet152"],
                  "Backbone of every variant.")
flags.DEFINE_list("variants", ["baseline", "global+local"], "Variants to time; the first "
                  "is the reference of the ratios.")
flags.DEFINE_integer("image_size", 224, "Square training image side, pixels.")
flags.DEFINE_integer("batch_size", 8, "Images per step.")
flags.DEFINE_integer("steps", 3, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Round-robin rounds over the variants.")
flags.DEFINE_integer("num_classes", 1000, "ArcFace classes.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy (mixed_float16 with dynamic loss scaling).")
flags.DEFINE_bool("sync_batchnorm", True, "Synchronized BatchNorm, as training uses.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from glam_tf.model import ArcFace, ModelConfig, build_descriptor_model
    from glam_tf.config import TrainConfig
    from glam_tf.train.loop import dtype_policy, make_optimizer
    from glam_tf.train.random_data import random_train_dataset
    from glam_tf.train.step import make_train_step, set_synchronized_batchnorm

    strategy = tf.distribute.get_strategy()
    steps = {}
    for variant in FLAGS.variants:
        keras.utils.set_random_seed(0)
        with dtype_policy(FLAGS.precision):
            model = build_descriptor_model(ModelConfig(
                backbone=FLAGS.backbone, weights="none", variant=variant))
            if FLAGS.sync_batchnorm:
                set_synchronized_batchnorm(model)
            head = ArcFace(FLAGS.num_classes, dtype="float32")
            head.build((None, 512))
            optimizer = make_optimizer(TrainConfig(
                train_dir="bench", precision=FLAGS.precision, optimizer="sgd",
                learning_rate=1e-3, momentum=0.9, weight_decay=1e-5), 1e-3)
            optimizer.build(model.trainable_variables + head.trainable_variables)
            step = tf.Variable(0, dtype=tf.int64, trainable=False)
        iterator = iter(random_train_dataset(
            global_batch_size=FLAGS.batch_size, image_size=(FLAGS.image_size,) * 2,
            num_classes=FLAGS.num_classes))
        fn = make_train_step(strategy, model, head, optimizer, step,
                             global_batch_size=FLAGS.batch_size, local_replicas=1)
        t0 = time.perf_counter()
        float(fn(iterator, tf.constant(0))[0])
        print(f"{variant}: {model.count_params() / 1e6:.2f}M params, trace + first step "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        steps[variant] = (fn, iterator)
    def leg(fn, iterator):
        def run():
            for _ in range(FLAGS.steps):
                float(fn(iterator, tf.constant(0))[0])
        return run

    times = harness.compare({v: leg(*steps[v]) for v in FLAGS.variants}, rounds=FLAGS.rounds,
                            warmup=1)
    reference = times[FLAGS.variants[0]]
    print(f"\n{FLAGS.backbone}, {FLAGS.image_size}x{FLAGS.image_size}, batch "
          f"{FLAGS.batch_size}, {FLAGS.precision}, {FLAGS.rounds}x{FLAGS.steps} steps each; "
          f"{harness.header()}")
    print(f"| variant | s/step (median) | images/s | ratio to {FLAGS.variants[0]} (per round) |")
    print("|---|---|---|---|")
    rows = {}
    for variant, t in times.items():
        med = t.median / FLAGS.steps
        r = harness.ratio(t, reference)
        rows[variant] = {"s_per_step": round(med, 4),
                         "images_per_s": round(FLAGS.batch_size / med, 2),
                         "ratio": round(r.value, 3), "ratio_per_round": [round(r.low, 3),
                                                                          round(r.high, 3)]}
        print(f"| {variant} | {med:.3f} | {FLAGS.batch_size / med:.1f} | {r.value:.2f} "
              f"({r.low:.2f}-{r.high:.2f}) |")
    print("JSON " + json.dumps({
        "bench": "train_step", "backbone": FLAGS.backbone, "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size, "precision": FLAGS.precision,
        "reference": FLAGS.variants[0], "variants": rows,
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        "machine": harness.machine()}))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
