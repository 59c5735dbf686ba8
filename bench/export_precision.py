"""Export precision (float32 / bfloat16 / float16): latency, and accuracy of a trained run.

Latency: a descriptor model with random weights (--backbone, weights none: speed does not
depend on them) in one serving module per precision (glam_tf.export.build_serving_module,
in-process: the tf.functions the SavedModel exports, without the save/load), timed through
its `global_descriptor` signature on one random --long_side x 3/4 uint8 image at
--scales (default: one scale, 1.0). All precisions live in one process: each is called
once (graph optimisation, reported apart), --warmup untimed rounds follow, then --reps
rounds call every precision once, the order rotated each round (bench/harness.py: load
from other processes and warm caches favour none); medians of wall-clock and process CPU
time, the spread of the per-round ratios, and the CPU's instruction-set level beside them
(bfloat16 is fast only with native bfloat16: AVX512-BF16 or AMX). Also the cosine of each
precision's descriptor of that image to float32's (random weights).

Accuracy (with --train_dir, e.g. the demo's run): the run's model restored from its newest
checkpoint, served at the run's evaluation settings (train_config.json: evaluation
max_image_size and scales) in each precision:
  - cosine to the float32 descriptor (global_descriptor signature) of every real photo
    under --photos_dir (*.jpg, *.jpeg, *.png, recursively): min, mean and the worst photo;
  - mAP (easy / medium / hard) on the synthetic test split under --synth_root, through
    the module's batched_global_descriptors signature (glam_tf.eval.run_evaluation).

Prints a table with the ratio float32 time / precision time (> 1: faster) and one JSON line
starting with "JSON ".

  python bench/export_precision.py                                  # resnet101, 1024 px
  python bench/export_precision.py --backbone=resnet50 --reps=3 --precisions=float32,bfloat16
  python bench/export_precision.py --train_dir=runs/demo --synth_root=data/synth_demo
"""

import glob
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from glam_tf.config import EXPORT_PRECISIONS, EvalConfig  # noqa: E402
from glam_tf.export import build_serving_module, restore_descriptor_model  # noqa: E402
from glam_tf.model import BACKBONES, VARIANTS, ModelConfig, build_descriptor_model  # noqa: E402

import harness  # noqa: E402  (this folder: the order-balanced timing of the benches)

FLAGS = flags.FLAGS
flags.DEFINE_enum("backbone", "resnet101", BACKBONES, "Backbone of the latency model.")
flags.DEFINE_enum("variant", "global+local", VARIANTS, "GLAM variant of the latency model.")
flags.DEFINE_integer("long_side", 1024, "Longer side of the latency test image (px; the "
                     "shorter is 3/4 of it); also the module's max_image_size.")
flags.DEFINE_list("scales", ["1.0"], "Scales of the latency modules' global_descriptor.")
flags.DEFINE_list("precisions", list(EXPORT_PRECISIONS), "Precisions to compare; float32 "
                  "is always measured (the reference).")
flags.DEFINE_integer("reps", 5, "Timed rounds (median reported).")
flags.DEFINE_integer("warmup", 1, "Untimed rounds after the first calls.")
flags.DEFINE_string("train_dir", None, "A trained run directory (model_config.json, "
                    "train_config.json, checkpoints/): also measure accuracy.")
flags.DEFINE_string("photos_dir", os.path.join(REPO, "..", "shared", "data"),
                    "Real photos for the cosine to float32 (searched recursively).")
flags.DEFINE_string("synth_root", "data/synth_demo", "Folder holding the synthetic test "
                    "split synth/ (the demo writes it).")


def _cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _precisions():
    wanted = [p.strip() for p in FLAGS.precisions if p.strip()]
    bad = [p for p in wanted if p not in EXPORT_PRECISIONS]
    if bad:
        raise app.UsageError(f"--precisions must list values of {', '.join(EXPORT_PRECISIONS)}"
                             f"; received {','.join(bad)}.")
    return ["float32"] + [p for p in dict.fromkeys(wanted) if p != "float32"]


def latency(precisions):
    long_side, short_side = FLAGS.long_side, int(round(FLAGS.long_side * 0.75))
    scales = tuple(float(s) for s in FLAGS.scales)
    config = ModelConfig(backbone=FLAGS.backbone, weights="none", variant=FLAGS.variant)
    logging.info("Building %s / %s (weights none)", config.backbone, config.variant)
    keras.utils.set_random_seed(0)   # the same random weights in every run
    model = build_descriptor_model(config)
    modules = {p: build_serving_module(model, max_image_size=long_side, scales=scales,
                                       precision=p) for p in precisions}
    rng = np.random.RandomState(0)
    small = rng.uniform(0, 255, (1, short_side // 32, long_side // 32, 3)).astype(np.float32)
    image = tf.constant(np.clip(tf.image.resize(small, (short_side, long_side)).numpy()[0],
                                0, 255).astype(np.uint8))
    outputs = {}

    def case(p):
        def fn():
            outputs[p] = modules[p].global_descriptor(image)["global_descriptor"].numpy()
        return fn

    results = harness.compare({p: case(p) for p in precisions}, rounds=FLAGS.reps,
                              warmup=1 + FLAGS.warmup, log=logging.info)
    machine = harness.machine()
    rows = {}
    for p, t in results.items():
        speedup = harness.ratio(results["float32"], t)
        rows[p] = {**t.summary(), "speedup": round(speedup.value, 3),
                   "speedup_per_round": [round(speedup.low, 3), round(speedup.high, 3)],
                   "cpu_speedup": round(speedup.cpu, 3),
                   "cosine_random_weights": round(_cosine(outputs[p], outputs["float32"]), 6)}
    print(f"\nLatency: {config.backbone} / {config.variant}, weights none, global_descriptor "
          f"of one {short_side}x{long_side} image at scales {scales} (in-process serving "
          f"module), {FLAGS.reps} timed rounds, TF {tf.__version__}; at the end "
          f"{harness.header()}")
    print(f"{'precision':<10}{'ISA':>13}{'first s':>9}{'median s':>10}{'CPU s':>8}"
          f"{'x f32':>8}{'per round':>13}{'x f32 CPU':>10}{'cosine':>10}")
    for p, r in rows.items():
        lo, hi = r["speedup_per_round"]
        print(f"{p:<10}{machine['isa']:>13}{r['first_s']:>9.2f}{r['median_s']:>10.3f}"
              f"{r['cpu_median_s']:>8.2f}{r['speedup']:>8.2f}{f'{lo:.2f}-{hi:.2f}':>13}"
              f"{r['cpu_speedup']:>10.2f}{r['cosine_random_weights']:>10.5f}")
    return {"backbone": config.backbone, "variant": config.variant,
            "image": [short_side, long_side], "scales": list(scales), "reps": FLAGS.reps,
            "machine": machine, "precisions": rows}


def _photos(root):
    paths = [p for ext in ("jpg", "jpeg", "png", "JPG")
             for p in glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)]
    return sorted(set(paths))


def _run_settings(train_dir):
    """(max_image_size, scales) of the run's evaluation (train_config.json)."""
    with open(os.path.join(train_dir, "train_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    evaluation = config.get("evaluation", {})
    export = config.get("export_settings", {})
    size = evaluation.get("max_image_size") or export.get("max_image_size")
    scales = evaluation.get("scales") or export.get("scales")
    return int(size), tuple(float(s) for s in scales)


def accuracy(precisions):
    from glam_tf.eval import models, run_evaluation  # noqa: PLC0415

    train_dir = FLAGS.train_dir
    max_size, scales = _run_settings(train_dir)
    model, model_config, prefix = restore_descriptor_model(train_dir)
    modules = {p: build_serving_module(model, max_image_size=max_size, scales=scales,
                                       precision=p) for p in precisions}
    photos = _photos(FLAGS.photos_dir)
    if not photos:
        raise app.UsageError(f"no photos under --photos_dir={FLAGS.photos_dir!r}.")
    descriptors = {p: [] for p in precisions}
    for path in photos:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        for p in precisions:
            descriptors[p].append(
                modules[p].global_descriptor(image)["global_descriptor"].numpy())
    names = [os.path.relpath(p, FLAGS.photos_dir) for p in photos]
    result = {"train_dir": train_dir, "checkpoint": prefix, "backbone": model_config.backbone,
              "max_image_size": max_size, "scales": list(scales), "photos": len(photos),
              "precisions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for p in precisions:
            cos = np.array([_cosine(a, b) for a, b in
                            zip(descriptors[p], descriptors["float32"])])
            backend = models.from_serving_module(
                modules[p], info={"kind": "module", "precision": p},
                fingerprint=f"precision:{p}:{prefix}")
            config = EvalConfig(dataset="synth", data_root=FLAGS.synth_root,
                                output_dir=os.path.join(tmp, p), max_image_size=max_size,
                                scales=scales)
            results = run_evaluation(config, backend=backend, print_table=False)
            if results["status"] != "complete":
                raise RuntimeError(f"evaluation in {p} did not complete: {results['status']}")
            result["precisions"][p] = {
                "cosine_min": round(float(cos.min()), 6),
                "cosine_mean": round(float(cos.mean()), 6),
                "worst_photo": names[int(np.argmin(cos))],
                "mAP": {split: m["mAP"] for split, m in results["metrics"].items()},
            }
    ref = result["precisions"]["float32"]["mAP"]
    print(f"\nAccuracy: {train_dir} ({model_config.backbone}, {prefix}), served at "
          f"{max_size} px, scales {scales}: cosine to float32 on {len(photos)} photos under "
          f"{FLAGS.photos_dir}; mAP on {FLAGS.synth_root}/synth (E / M / H)")
    print(f"{'precision':<10}{'cos min':>10}{'cos mean':>10}  {'worst photo':<26}"
          f"{'mAP E / M / H':>22}{'vs float32':>22}")
    for p, r in result["precisions"].items():
        m = r["mAP"]
        maps = " / ".join(f"{m[s]:.2f}" for s in ("easy", "medium", "hard"))
        delta = " / ".join(f"{m[s] - ref[s]:+.2f}" for s in ("easy", "medium", "hard"))
        worst = "-" if p == "float32" else os.path.basename(r["worst_photo"])
        print(f"{p:<10}{r['cosine_min']:>10.5f}{r['cosine_mean']:>10.5f}  "
              f"{worst:<26}{maps:>22}{delta:>22}")
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.reps < 1 or FLAGS.warmup < 0:
        raise app.UsageError("--reps must be >= 1 and --warmup >= 0.")
    precisions = _precisions()
    print(harness.header(), flush=True)
    out = {"bench": "export_precision", "latency": latency(precisions)}
    if FLAGS.train_dir:
        out["accuracy"] = accuracy(precisions)
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    app.run(main)
