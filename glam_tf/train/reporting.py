"""Observability of a training run: progress lines, TensorBoard scalars, attention summary.

GeM p is read from the model's "gem" layer and the fusion weights softmax(beta) from its
"glam" layer (absent for the baseline variant), so their trajectory shows in TensorBoard
and their final values are printed at the end of a run.
"""

from __future__ import annotations

import collections
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from glam_tf import files
from glam_tf.data.progress import format_seconds

# What tensorboard.summary.scalar writes, built here so that training needs no tensorboard
# package (TF 2.21 does not install it; tf.summary.scalar raises without it).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


class Progress:
    """Step counter with a moving images/s rate and the ETA of the remaining steps.

    Args:
        total_steps: last step of the run.
        start_step: step the run (re)starts from.
        global_batch_size: images per step.
        window: number of recent steps the rate is averaged over (the first step, which
            traces the tf.function, drops out of it).
    """

    def __init__(self, *, total_steps: int, start_step: int, global_batch_size: int,
                 window: int = 50):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.step = start_step
        self.loss = float("nan")
        self.accuracy = float("nan")
        self._times = collections.deque([(start_step, time.monotonic())], maxlen=window + 1)

    def update(self, step: int, loss: float, accuracy: float) -> None:
        """Records that `step` finished with this loss and accuracy."""
        self.step, self.loss, self.accuracy = step, loss, accuracy
        self._times.append((step, time.monotonic()))

    def seconds_per_step(self) -> float:
        (s0, t0), (s1, t1) = self._times[0], self._times[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else float("nan")

    def images_per_second(self) -> float:
        sps = self.seconds_per_step()
        return self.global_batch_size / sps if sps > 0 else float("nan")

    def line(self, learning_rate: float) -> str:
        """e.g. `step 120/1000 (12.0%) loss 3.2104 acc 0.250 lr 9.80e-04 18.3 img/s ETA 0:12:03`."""
        remaining = (self.total_steps - self.step) * self.seconds_per_step()
        eta = format_seconds(remaining) if np.isfinite(remaining) else "?"
        return (f"step {self.step}/{self.total_steps} "
                f"({100.0 * self.step / self.total_steps:.1f}%) loss {self.loss:.4f} "
                f"acc {self.accuracy:.3f} lr {learning_rate:.2e} "
                f"{self.images_per_second():.1f} img/s ETA {eta}")


def attention_scalars(model: keras.Model) -> dict:
    """{"gem_p": p, "fusion/<branch>": weight, ...} read from the "gem" and "glam" layers.

    Fusion branch names: "local", "global" (those the variant has) and "identity" (the
    weight w of F itself); the weights sum to 1 (GLAM_SPEC "Fusion").
    """
    scalars = {}
    layer_names = {layer.name for layer in model.layers}
    if "gem" in layer_names:
        p = keras.ops.convert_to_numpy(model.get_layer("gem").p)
        scalars["gem_p"] = float(np.reshape(p, (-1,))[0])
    if "glam" in layer_names:
        glam = model.get_layer("glam")
        weights = keras.ops.convert_to_numpy(glam.fusion_weights())
        names = (["local"] if glam.has_local else []) + (
            ["global"] if glam.has_global else []) + ["identity"]
        for name, w in zip(names, weights):
            scalars[f"fusion/{name}"] = float(w)
    return scalars


def format_attention(scalars: dict) -> str:
    """One line: `GeM p 3.012; fusion weights local 0.334, global 0.335, identity 0.331`."""
    parts = []
    if "gem_p" in scalars:
        parts.append(f"GeM p {scalars['gem_p']:.3f}")
    fusion = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in scalars.items()
              if k.startswith("fusion/")]
    parts.append("fusion weights " + ", ".join(fusion) if fusion
                 else "no fusion (baseline variant)")
    return "; ".join(parts)


def scalar_summary(name: str, value: float, step: int) -> None:
    """One TensorBoard scalar (float32) into the default summary writer."""
    tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                     metadata=_SCALAR_METADATA)


def write_scalars(step: int, loss: float, accuracy: float, learning_rate: float,
                  model: keras.Model, images_per_second: float, data_stats=None,
                  loss_scale=None) -> None:
    """TensorBoard scalars of one step: loss, accuracy, lr, images/s, GeM p, fusion, with
    `data_stats` (glam_tf.data.pipeline.DecodeStats) the records the input left out, and
    with `loss_scale` (mixed_float16) the dynamic loss scale."""
    scalar_summary("train/loss", loss, step)
    scalar_summary("train/accuracy", accuracy, step)
    scalar_summary("train/learning_rate", learning_rate, step)
    if loss_scale is not None:
        scalar_summary("train/loss_scale", loss_scale, step)
    if np.isfinite(images_per_second):
        scalar_summary("train/images_per_second", images_per_second, step)
    for name, value in attention_scalars(model).items():
        scalar_summary(f"attention/{name}", value, step)
    if data_stats is not None:
        counts = data_stats.result()
        scalar_summary("data/undecodable_dropped", counts["dropped"], step)
        for name in ("damaged_spans", "damaged_bytes", "damaged_records"):
            scalar_summary(f"data/{name}_skipped", counts[name], step)


def read_scalars(event_dir: str) -> dict:
    """{tag: {step: value}} of the scalars in the event files under `event_dir`."""
    out = {}
    for path in files.glob(files.join(event_dir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[int(event.step)] = float(
                    tf.make_ndarray(value.tensor))
    return out


def map_summary(results: dict) -> str:
    """`mAP E 12.34 M 23.45 H 3.21` of a revisited result (or `mAP 45.67` for original)."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    m = results["metrics"]
    if "medium" in m:
        return "mAP " + " ".join(f"{s[0].upper()} {fmt(m[s]['mAP'])}"
                                 for s in ("easy", "medium", "hard"))
    return "mAP " + " ".join(fmt(v["mAP"]) for v in m.values())
