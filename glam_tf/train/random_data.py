"""Stand-in training data without files: random images whose coarse pattern encodes the class.

For tests and benchmarks (TrainConfig.data_source = "random"). Batch `k` of the global
stream is a pure function of (seed, k), so any split of it over workers or replicas is
the same data as the whole: a one-process run and a multi-worker run see the same global
batches, which is what the distribution tests compare.
"""

from __future__ import annotations

import tensorflow as tf

# Each class is a 4x4 grid of random colours (upsampled to the image size), plus noise.
_PATTERN_CELLS = 4
_PATTERN_AMPLITUDE = 60.0
_NOISE_AMPLITUDE = 40.0


def random_train_dataset(*, global_batch_size: int, image_size: tuple, num_classes: int,
                         seed: int = 0, num_input_pipelines: int = 1,
                         input_pipeline_id: int = 0) -> tf.data.Dataset:
    """Endless batches (images, labels) of the global stream, this pipeline's slice.

    Args:
        global_batch_size: images per global batch (divisible by num_input_pipelines).
        image_size: (height, width).
        num_classes: labels are uniform in [0, num_classes).
        seed: the whole stream is a function of it.
        num_input_pipelines, input_pipeline_id: this worker's contiguous slice of every
            global batch.

    Returns:
        tf.data.Dataset of (float32 (B, H, W, 3) in [0, 255], int32 (B,)) with
        B = global_batch_size // num_input_pipelines. Its iterator is checkpointable.
    """
    if global_batch_size % num_input_pipelines:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the "
            f"{num_input_pipelines} input pipelines.")
    per = global_batch_size // num_input_pipelines
    height, width = int(image_size[0]), int(image_size[1])
    patterns = tf.random.stateless_uniform(
        (num_classes, _PATTERN_CELLS, _PATTERN_CELLS, 3), seed=[seed, 1 << 20],
        minval=-1.0, maxval=1.0)

    def make_batch(k):
        labels = tf.random.stateless_uniform(
            (global_batch_size,), seed=tf.stack([tf.cast(seed, tf.int64), 2 * k]),
            maxval=num_classes, dtype=tf.int32)
        noise = tf.random.stateless_uniform(
            (global_batch_size, height, width, 3),
            seed=tf.stack([tf.cast(seed, tf.int64), 2 * k + 1]), minval=-1.0, maxval=1.0)
        pattern = tf.image.resize(tf.gather(patterns, labels), (height, width),
                                  method="nearest")
        images = tf.clip_by_value(
            127.5 + _PATTERN_AMPLITUDE * pattern + _NOISE_AMPLITUDE * noise, 0.0, 255.0)
        start = input_pipeline_id * per
        return images[start:start + per], labels[start:start + per]

    return tf.data.Dataset.range(0, 1 << 62).map(make_batch).prefetch(2)
