"""Benchmark: batched (size-bucketed) vs one-at-a-time descriptor extraction, one process.

Exports a GLAM model (--backbone, ResNet50 by default; weights none) as a SavedModel with glam_tf.export
(or, if that package is unusable, wraps glam_tf.model.build_descriptor_model in a
tf.function; the output says which), then runs glam_tf.eval.extract.extract_split on the
same images with --batch_size and with batch size 1, and prints images/s and the ratio.
Every comparison is timed through bench/harness.py: one untimed call of each leg first,
then rounds with the legs' order rotated (medians, with the per-round
spread and the machine: CPU, instruction-set level, load).
Image sets: "oxford-like" (landscape 1024x768 and portrait 768x1024 JPEGs, as most of
Oxford/Paris; few buckets) and, when ../shared/data is present, the 55 real query crops
(mixed sizes: buckets of one or two images).

With a SavedModel back-end it then times the Beam pipeline (glam_tf.eval.extract_beam) for
each leg of --beam_workers: 0 = the extraction's default (below 1000 images the
DirectRunner's one in-memory worker, reusing the driver's model; else 2 worker processes),
N = N DirectRunner worker processes each loading the SavedModel (TensorFlow's default
threads), Na = the same with TensorFlow limited to max(1, cores // N) threads per worker
(GLAM_BEAM_TF_THREADS=auto); against the in-process batched extraction on --beam_images small images (--beam_image_px, 4:3 landscape
and portrait, as the demo's) in --beam_shards shards, legs warmed up and rotated in the same
run, median of --beam_repeats. Both include their start-up (the in-process path's model is loaded before
the clock starts, as eval_main loads it in the driver before the pipeline); the Beam legs
also report their time in shards (Beam distribution shard_ms, over the workers) and the rest
(worker processes, TensorFlow imports, model loads: start-up and overhead), and the
descriptors are checked against the in-process ones (goal: ratio >= 0.9).

  .venv/bin/python bench/extract.py --num_images=8 --num_real=0 --repeats=1 --max_image_size=192 \
      --beam_images=240 --beam_workers=0,2 --beam_repeats=2
  .venv/bin/python bench/extract.py --max_image_size=256 --batch_size=8
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
import tensorflow as tf  # pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
import harness  # this folder
from glam_tf.eval import extract, models
from glam_tf.model import ModelConfig, build_descriptor_model


def _backend(model, scales, max_image_size, tmp):
    """A SavedModel back-end via glam_tf.export, else a tf.function over the Keras model."""
    try:
        from glam_tf.export import export_saved_model  # pylint: disable=import-outside-toplevel
        path = export_saved_model(model, os.path.join(tmp, "glam"), scales=scales,
                                  max_image_size=max_image_size)
        return (models.load_saved_model(path), "SavedModel (glam_tf.export, batched signature)",
                path)
    except ImportError as e:
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def describe(images):
            hw = tf.cast(tf.shape(images)[1:3], tf.float32)
            rows = [model(tf.image.resize(images, tf.cast(tf.round(hw * s), tf.int32)),
                          training=False) for s in scales]
            return tf.math.l2_normalize(tf.add_n(rows), axis=-1)

        backend = models.DescriptorBackend(fn=lambda x: describe(x).numpy(), scales=scales,
                                           info={"kind": "tf.function"}, fingerprint="bench")
        return (backend, f"tf.function over build_descriptor_model (export unusable: {e})",
                None)


def _oxford_like(folder, n, seed=0, size=(1024, 768)):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    items = []
    base = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, 7 * i, axis=1)).resize(size, Image.BILINEAR)
        if i % 3 == 2:
            img = img.transpose(Image.Transpose.ROTATE_90)
        path = os.path.join(folder, f"img{i:03d}.jpg")
        img.save(path, quality=90)
        items.append(extract.ImageItem(f"img{i:03d}", path))
    return items


def _real_crops():
    folder = os.path.join(os.path.dirname(REPO), "shared", "data", "oxford_query_crops")
    if not os.path.isdir(folder):
        return None
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
    return [extract.ImageItem(n, os.path.join(folder, n)) for n in names]


def _extraction(items, backend, folder, *, batch_size, max_image_size, shard_size=None):
    """A callable extracting `items` into a fresh sub-folder of `folder` at each call."""
    calls = []

    def run():
        out = os.path.join(folder, str(len(calls)))
        calls.append(out)
        extract.extract_split(items, out, backend, max_image_size=max_image_size,
                              batch_size=batch_size, shard_size=shard_size or len(items),
                              log_every_s=1e9)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_images", type=int, default=24, help="oxford-like images")
    p.add_argument("--num_real", type=int, default=24, help="real crops used (max 55)")
    p.add_argument("--variant", default="global+local")
    p.add_argument("--backbone", default="resnet50",
                   choices=("resnet50", "resnet101", "resnet152"))
    p.add_argument("--beam_images", type=int, default=300,
                   help="images of the Beam-vs-in-process comparison (0: skip)")
    p.add_argument("--beam_image_px", type=int, default=192,
                   help="their shorter side (landscape 4:3 and portrait, as oxford-like)")
    p.add_argument("--beam_shards", type=int, default=4)
    p.add_argument("--beam_workers", default="0,2",
                   help="DirectRunner worker processes to time, comma-separated (0: the "
                        "extraction's default for --beam_images; 2a: 2 processes "
                        "with GLAM_BEAM_TF_THREADS=auto)")
    p.add_argument("--beam_repeats", type=int, default=2,
                   help="timed rounds of each leg after one warm-up run, order rotated")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds after one warm-up run (per-shape first calls)")
    args = p.parse_args()
    print(harness.header(), flush=True)
    scales = models.DEFAULT_SCALES
    model = build_descriptor_model(ModelConfig(backbone=args.backbone, weights="none",
                                               variant=args.variant))
    with tempfile.TemporaryDirectory() as tmp:
        backend, kind, saved_model = _backend(model, scales, args.max_image_size, tmp)
        sets = {"oxford-like": _oxford_like(os.path.join(tmp, "img"), args.num_images)}
        crops = _real_crops()
        if crops and args.num_real > 0:
            sets["real-crops"] = crops[:args.num_real]
        results = {"backend": kind, "backbone": args.backbone, "max_image_size": args.max_image_size,
                   "batch_size": args.batch_size, "scales": list(scales),
                   "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU"}
        for tag, items in sets.items():
            # one untimed call of each (first calls per batch shape allocate and autotune),
            # then rounds in alternating order
            times = harness.compare({
                "batched": _extraction(items, backend, os.path.join(tmp, f"{tag}-batched"),
                                       batch_size=args.batch_size,
                                       max_image_size=args.max_image_size),
                "single": _extraction(items, backend, os.path.join(tmp, f"{tag}-single"),
                                      batch_size=1, max_image_size=args.max_image_size)},
                rounds=args.repeats, warmup=1)
            speed = harness.ratio(times["single"], times["batched"])
            batched, single = times["batched"].median, times["single"].median
            sizes = {extract.target_size(*extract.read_size(it.path), None, args.max_image_size,
                                         backend.min_side())[0] for it in items}
            results[tag] = {"images": len(items), "distinct_sizes": len(sizes),
                            "batched_images_per_s": round(len(items) / batched, 2),
                            "single_images_per_s": round(len(items) / single, 2),
                            "speedup_batched_over_single": round(speed.value, 2),
                            "speedup_spread": speed.summary()}
            print(f"{tag}: {len(items)} images, {len(sizes)} sizes: batched "
                  f"{len(items) / batched:.2f} img/s, one at a time {len(items) / single:.2f} "
                  f"img/s, batched {speed} faster  [{kind}]", flush=True)
        if saved_model and args.beam_images > 0:
            results["beam"] = _beam_vs_in_process(args, backend, saved_model, scales, tmp)
        results["machine"] = harness.machine()
        print(json.dumps(results))
        print(harness.header())


def _beam_args(leg):
    """0: the extraction's local default for this many images; N: N worker processes
    (TensorFlow's default threads; "Na": GLAM_BEAM_TF_THREADS=auto, cores // N each)."""
    workers = int(leg.rstrip("a"))
    return [f"--direct_num_workers={workers}"] if workers else []


def _beam_vs_in_process(args, backend, saved_model, scales, tmp):
    """Seconds of the in-process extraction and of the Beam pipeline (each worker count of
    --beam_workers), same images and shards, through bench/harness.py (warm-up, rotated
    order, median of --beam_repeats)."""
    from glam_tf import beam_options  # pylint: disable=import-outside-toplevel
    from glam_tf.eval import extract_beam  # pylint: disable=import-outside-toplevel

    px = args.beam_image_px
    items = _oxford_like(os.path.join(tmp, "beam_img"), args.beam_images, seed=1,
                         size=(px * 4 // 3, px))
    shard_size = -(-len(items) // args.beam_shards)
    spec = extract_beam.BackendSpec(model=saved_model, scales=tuple(scales),
                                    max_image_size=args.max_image_size)
    # as eval_main: the driver loads the model with the factory before extracting (the
    # in-memory worker reuses it; worker processes load their own)
    backend = spec.build()
    workers = args.beam_workers.split(",")
    legs = {"in_process": _extraction(items, backend, os.path.join(tmp, "local"),
                                      batch_size=args.batch_size,
                                      max_image_size=args.max_image_size,
                                      shard_size=shard_size)}
    last, tf_threads, calls = {}, {}, {}

    def beam_leg(w):
        def run():
            calls[w] = calls.get(w, 0) + 1  # a fresh folder per call: Beam resumes a done one
            out = os.path.join(tmp, f"beam{w}-{calls[w]}")
            if w.endswith("a"):
                os.environ[extract_beam.TF_THREADS_ENV] = "auto"
            try:
                tf_threads[w] = extract_beam.local_tf_threads(beam_options.pipeline_options(
                    extract_beam.local_args(_beam_args(w), num_images=len(items))))
                _, metrics = extract_beam.extract_splits(
                    [(items, out, "bench")], backend, spec.build,
                    beam_args=_beam_args(w), max_image_size=args.max_image_size,
                    batch_size=args.batch_size, shard_size=shard_size)
            finally:
                os.environ.pop(extract_beam.TF_THREADS_ENV, None)
            last[w] = (metrics, out)
            print(f"Beam {_beam_args(w) or '(default)'}: {metrics}", flush=True)
        return run

    for w in workers:
        legs[f"beam_{w}"] = beam_leg(w)
    # one untimed run of every leg, then rounds in rotated order (bench/harness.py); CPU
    # times count this process only (not Beam's worker processes)
    times = harness.compare(legs, rounds=args.beam_repeats, warmup=1)
    ids = [it.id for it in items]
    ref = extract.merge_shards(os.path.join(tmp, "local", "0"), ids).descriptors
    local_s = times["in_process"].median
    res = {"images": len(items), "image_size": [px * 4 // 3, px], "shards": args.beam_shards,
           "seconds_per_run": {k: t.wall for k, t in times.items()},
           "in_process_images_per_s": round(len(items) / local_s, 2)}
    for w in workers:
        m, out = last[w]
        total = times[f"beam_{w}"].median
        desc = extract.merge_shards(out, ids).descriptors
        # the workers' time in shards (spread evenly) vs the rest: processes, TF imports,
        # model loads, Beam's own work
        busy = (m.get("shard_ms", {}).get("sum", 0) / 1000
                / min(max(int(w.rstrip("a")), 1), args.beam_shards))
        load = m.get("model_load_ms", {}).get("max")
        speed = harness.ratio(times["in_process"], times[f"beam_{w}"])
        print(f"Beam {_beam_args(w) or '(default)'} / in process speed: {speed}", flush=True)
        res[f"beam_{w}"] = {
            "images_per_s": round(len(items) / total, 2),
            "ratio_over_in_process": speed.summary(),
            "seconds": round(total, 1),
            "start_up_and_overhead_s": round(total - busy, 1),
            "model_load_s_per_worker": None if load is None else round(load / 1000, 1),
            "describing_s": round(busy, 1),
            "describing_images_per_s": round(len(items) / busy, 2) if busy else None,
            "beam_args": _beam_args(w) or "(default)",
            "tf_threads_per_worker": tf_threads[w] or "TensorFlow's default",
            "max_abs_descriptor_difference": float(abs(desc - ref).max())}
    print(f"beam vs in-process: {json.dumps(res)}", flush=True)
    return res


if __name__ == "__main__":
    main()
