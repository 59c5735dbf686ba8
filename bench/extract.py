"""Benchmark: batched (size-bucketed) vs one-at-a-time descriptor extraction, one process.

Exports a GLAM model (--backbone, ResNet50 by default; weights none) as a SavedModel with glam_tf.export
(or, if that package is unusable, wraps glam_tf.model.build_descriptor_model in a
tf.function; the output says which), then runs glam_tf.eval.extract.extract_split on the
same images with --batch_size and with batch size 1, and prints images/s and the ratio.
Image sets: "oxford-like" (landscape 1024x768 and portrait 768x1024 JPEGs, as most of
Oxford/Paris; few buckets) and, when ../shared/data is present, the 55 real query crops
(mixed sizes: buckets of one or two images).

With a SavedModel back-end it then times the Beam pipeline (glam_tf.eval.extract_beam,
DirectRunner, --beam_workers processes, each loading the SavedModel once) against the
in-process batched extraction on --beam_images oxford-like images in 4 shards, in the same
run; both include their start-up (the pipeline's worker processes and model loads; the
in-process path's model is loaded before the clock starts, as eval_main loads it before
extracting), and the descriptors are checked equal (goal: ratio >= 0.9).

  .venv/bin/python bench/extract.py --max_image_size=256 --batch_size=8
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import tensorflow as tf  # pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
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


def _oxford_like(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    items = []
    base = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, 7 * i, axis=1)).resize((1024, 768), Image.BILINEAR)
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


def _time(items, backend, tmp, tag, *, batch_size, max_image_size, repeats):
    best = float("inf")
    for r in range(repeats):
        out = os.path.join(tmp, f"{tag}-b{batch_size}-{r}")
        t0 = time.perf_counter()
        extract.extract_split(items, out, backend, max_image_size=max_image_size,
                              batch_size=batch_size, shard_size=len(items), log_every_s=1e9)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_images", type=int, default=24, help="oxford-like images")
    p.add_argument("--num_real", type=int, default=24, help="real crops used (max 55)")
    p.add_argument("--variant", default="global+local")
    p.add_argument("--backbone", default="resnet50",
                   choices=("resnet50", "resnet101", "resnet152"))
    p.add_argument("--beam_images", type=int, default=64,
                   help="oxford-like images of the Beam-vs-in-process comparison (0: skip)")
    p.add_argument("--beam_workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2,
                   help="best of this many runs (first runs pay per-shape warm-up)")
    args = p.parse_args()
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
            # warm-up: one call per batch shape (first calls allocate and autotune)
            _time(items[:args.batch_size], backend, tmp, f"warm-{tag}",
                  batch_size=args.batch_size, max_image_size=args.max_image_size, repeats=1)
            _time(items[:2], backend, tmp, f"warm1-{tag}", batch_size=1,
                  max_image_size=args.max_image_size, repeats=1)
            batched = _time(items, backend, tmp, tag, batch_size=args.batch_size,
                            max_image_size=args.max_image_size, repeats=args.repeats)
            single = _time(items, backend, tmp, tag, batch_size=1,
                           max_image_size=args.max_image_size, repeats=args.repeats)
            sizes = {extract.target_size(*extract.read_size(it.path), None, args.max_image_size,
                                         backend.min_side())[0] for it in items}
            results[tag] = {"images": len(items), "distinct_sizes": len(sizes),
                            "batched_images_per_s": round(len(items) / batched, 2),
                            "single_images_per_s": round(len(items) / single, 2),
                            "speedup_batched_over_single": round(single / batched, 2)}
            print(f"{tag}: {len(items)} images, {len(sizes)} sizes: batched "
                  f"{len(items) / batched:.2f} img/s, one at a time {len(items) / single:.2f} "
                  f"img/s, ratio {single / batched:.2f}x  [{kind}]", flush=True)
        if saved_model and args.beam_images > 0:
            results["beam"] = _beam_vs_in_process(args, backend, saved_model, scales, tmp)
        print(json.dumps(results))


def _beam_vs_in_process(args, backend, saved_model, scales, tmp):
    """images/s of the Beam pipeline and of the in-process path, same images and shards."""
    from glam_tf.eval import extract_beam  # pylint: disable=import-outside-toplevel

    items = _oxford_like(os.path.join(tmp, "beam_img"), args.beam_images, seed=1)
    shard_size = -(-len(items) // 4)
    t0 = time.perf_counter()
    extract.extract_split(items, os.path.join(tmp, "local"), backend,
                          max_image_size=args.max_image_size, batch_size=args.batch_size,
                          shard_size=shard_size, log_every_s=1e9)
    local_s = time.perf_counter() - t0
    spec = extract_beam.BackendSpec(model=saved_model, scales=tuple(scales),
                                    max_image_size=args.max_image_size)
    t0 = time.perf_counter()
    extract_beam.extract_splits(
        [(items, os.path.join(tmp, "beam"), "bench")], backend, spec.build,
        beam_args=[f"--direct_num_workers={args.beam_workers}"],
        max_image_size=args.max_image_size, batch_size=args.batch_size, shard_size=shard_size)
    beam_s = time.perf_counter() - t0
    ids = [it.id for it in items]
    a = extract.merge_shards(os.path.join(tmp, "local"), ids).descriptors
    b = extract.merge_shards(os.path.join(tmp, "beam"), ids).descriptors
    out = {"images": len(items), "shards": 4, "workers": args.beam_workers,
           "in_process_images_per_s": round(len(items) / local_s, 2),
           "beam_images_per_s": round(len(items) / beam_s, 2),
           "ratio_beam_over_in_process": round(local_s / beam_s, 3),
           "max_abs_descriptor_difference": float(abs(a - b).max())}
    print(f"beam vs in-process: {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
