"""Input pipeline throughput: images/s per host core for decode + augment + resize + batch.

Generates 800x600 JPEGs with a natural-image-like 1/f^1.5 spectrum (quality 90, ~100 KB like
GLDv2 photos), writes them as DELG TFRecords, and times `build_train_dataset` (default
recipe: full-size aspect groups, crop 1 +- 0.2, brightness 0.1, batch 64) with the tf.data
thread pool limited to 1 thread and to all cores, in one process. Per-core figures divide the
images by the process CPU time, so they hold on a busy (shared) machine; wall-clock rates are
printed too. From the per-core rate it estimates how many host cores keep a training job fed:

  cores = ceil(steps_per_s * global_batch / (images/s per core))

Assumption (flags): the paper's setup, a global batch of 64 over 8 GPUs, and a model step rate
of --steps_per_s (default 2.5 steps/s for one 8-GPU batch-64 step of ResNet101-GLAM at
~512 px; measure yours and pass it).

  python bench/input_pipeline.py --num_images=128 --batches=8
"""

import io
import math
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402  (this folder)  # pylint: disable=wrong-import-position

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # noqa: E402  pylint: disable=wrong-import-position

from glam_tf.config import DataConfig  # noqa: E402  pylint: disable=wrong-import-position
from glam_tf.data import pipeline, records  # noqa: E402  pylint: disable=wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer("num_images", 128, "Distinct JPEGs generated.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches timed per setting (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Batches before timing starts.")
_BATCH = flags.DEFINE_integer("global_batch", 64, "Images per training step (all GPUs).")
_GPUS = flags.DEFINE_integer("gpus", 8, "GPUs sharing the global batch (for the printout).")
_STEPS_PER_S = flags.DEFINE_float(
    "steps_per_s", 2.5, "Model step rate to feed: global-batch steps per second.")
_SIZE_SCALE = flags.DEFINE_float("size_scale", 1.0, "DataConfig.size_scale.")


def natural_jpeg(rng: np.random.Generator, width=800, height=600, quality=90) -> bytes:
    """A JPEG with a 1/f^1.5 amplitude spectrum (compresses and decodes like a photo)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = np.maximum(np.hypot(fx, fy), 1.0 / max(width, height)) ** -1.5
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        plane = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))
        channels.append((plane - plane.mean()) / (plane.std() + 1e-9))
    mix = rng.normal(0, 1, (3, 3)) * 0.4 + np.eye(3)
    image = np.tensordot(np.stack(channels, -1), mix, axes=1) * 45 + rng.uniform(80, 170, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def measure(config, threads: int, batches: int, warmup: int) -> tuple:
    """(images per wall second, images per CPU second) with a `threads`-thread tf.data pool."""
    ds = pipeline.build_train_dataset(config)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    iterator = iter(ds.with_options(options))
    for _ in range(warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(batches):
        batch, _ = next(iterator)
        images += int(batch.shape[0])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return images / wall, images / cpu


def main(argv):
    del argv
    cores = os.cpu_count() or 1
    print(harness.header(), flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench-00000-of-00001.tfrecord")
        sizes = []
        with tf.io.TFRecordWriter(path) as writer:
            for k in range(_NUM_IMAGES.value):
                data = natural_jpeg(rng)
                sizes.append(len(data))
                info = records.probe_image(data, full_decode=False)
                writer.write(records.make_example(encoded=data, image_id=f"{k:016x}", label=k,
                                                  info=info).SerializeToString())
        print(f"{_NUM_IMAGES.value} JPEGs 800x600, mean {np.mean(sizes) / 1024:.0f} KB")
        config = DataConfig(
            file_pattern=path, global_batch_size=_BATCH.value, size_scale=_SIZE_SCALE.value,
            shuffle_buffer=min(128, _NUM_IMAGES.value))
        w, h = config.scaled_bucket_sizes()[1]  # 800x600: h/w = 0.75, group 1
        print(f"pipeline: decode + crop (1 +- {config.crop_scale}) + resize to {w}x{h} + "
              f"brightness +- {config.brightness} + batch {_BATCH.value}")
        rates = {}
        for threads in sorted({1, cores}):
            wall, cpu = measure(config, threads, _BATCHES.value, _WARMUP.value)
            rates[threads] = cpu
            print(f"  tf.data pool of {threads} thread(s): {wall:.1f} images/s wall, "
                  f"{cpu:.1f} images per CPU-second")
    per_core = min(rates.values())
    need = _STEPS_PER_S.value * _BATCH.value
    print(f"images/s per core: {per_core:.1f} (images per CPU-second, the lower of the "
          "settings above)")
    print(f"to feed {_GPUS.value} GPUs at global batch {_BATCH.value} and "
          f"{_STEPS_PER_S.value} steps/s ({need:.0f} images/s, an assumed model speed): "
          f"{math.ceil(need / per_core)} host cores")

if __name__ == "__main__":
    app.run(main)
