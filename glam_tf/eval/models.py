"""Descriptor back-ends for evaluation: a SavedModel, a training checkpoint, or a module.

Every back-end is a `DescriptorBackend`: a function from a batch of same-size uint8 images
(B, H, W, 3), already resized by the client to their target size, to (B, D) float32 unit
descriptors, multi-scale as the model was exported. TensorFlow is imported only when a
back-end is built, so flag checks and the pure parts stay light.

- SavedModel with `batched_global_descriptors`, at its export-time scales (read from
  `assets.extra/glam_export.json`): one call per batch.
- SavedModel with only `serving_default` (any DELG-style export), or asked for other scales
  than its export's: one call per image with `input_scales` = the client's scales; the DELG
  client rule: L2-normalise each row, sum over scales, L2-normalise again.
- Training directory (`model_config.json` + `checkpoints/`): the descriptor model restored
  in-process and wrapped by glam_tf.export.build_serving_module (no SavedModel written).
"""

import dataclasses
import hashlib
import json
import math

import numpy as np

from glam_tf import files
from glam_tf.config.contract import (
    DEFAULT_MAX_IMAGE_SIZE,
    DEFAULT_SCALES,
    EXPORT_INFO_FILE,
    MIN_IMAGE_SIZE,
    check_model_source,
    model_config_path,
    resolve_saved_model_dir,
)
from glam_tf.config.export import ExportConfig
from glam_tf.config.settings import fail, numbers_list

_SCALES_RULE = numbers_list()


@dataclasses.dataclass
class DescriptorBackend:
    """A batch descriptor function and what the report needs to know about it.

    Attributes:
        fn: uint8 (B, H, W, 3) same-size images -> (B, D) float32 unit rows.
        scales: the scales the model applies (None when unknown).
        info: JSON-able description for the report (kind, path, signature, ...).
        fingerprint: identifies model + settings, so cached features are not mixed up.
        min_image_size: smallest side the model accepts at any scale.
        keras_model: the Keras descriptor model behind `fn` when there is one (checkpoint
            or in-memory model; None for a SavedModel): what attention maps are read from.
    """

    fn: object
    scales: tuple
    info: dict
    fingerprint: str
    min_image_size: int = MIN_IMAGE_SIZE
    keras_model: object = None

    def min_side(self):
        """Smallest client-side image side such that every scale keeps >= min_image_size."""
        smallest = min(self.scales) if self.scales else 1.0
        return int(math.ceil(self.min_image_size / smallest))

    def __call__(self, images):
        out = np.asarray(self.fn(images), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"descriptor back-end returned shape {out.shape} for "
                             f"{images.shape[0]} images; expected (B, D)")
        return out


def check_scales(scales) -> tuple:
    """Scales as a tuple of floats, checked by the scales rule of the configs."""
    try:
        out = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        fail("scales", _SCALES_RULE.text, scales)
    if not _SCALES_RULE(out):
        fail("scales", _SCALES_RULE.text, scales)
    return out


def _file_stamp(paths):
    h = hashlib.sha1()
    for p in paths:
        if files.exists(p):
            size, mtime_ns = files.stat(p)
            h.update(f"{files.absolute(p)}:{size}:{mtime_ns};".encode())
    return h.hexdigest()[:16]


def _normalize_rows(x, axis=-1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def delg_client_descriptor(per_scale, aggregation="mean"):
    """DELG client rule: (S, D) per-scale rows -> (D,): L2 each row, sum, L2 (aggregation
    "max": the element-wise maximum instead of the sum, as an export with
    scale_aggregation=max does)."""
    rows = _normalize_rows(np.asarray(per_scale, np.float64))
    return _normalize_rows(rows.max(axis=0) if aggregation == "max" else np.sum(rows, axis=0))


def same_scales(a, b, tol=1e-6):
    """Whether two scale lists are equal up to float rounding (e.g. 0.70710678 vs 1/sqrt 2)."""
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def load_saved_model(path, *, scales=None):
    """A back-end from a SavedModel directory (version folder or its parent).

    `scales=None` takes the model's own: its export-time scales through
    `batched_global_descriptors` (one call per batch), or DEFAULT_SCALES for a DELG-style
    export. Other scales are honoured through `serving_default` (one call per image, the
    DELG client rule), as the batched signature cannot apply them; the choice is logged and
    recorded in `info`.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from absl import logging  # pylint: disable=import-outside-toplevel

    from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel

    from glam_tf.refusal import Refused  # pylint: disable=import-outside-toplevel

    version_dir = resolve_saved_model_dir(path)
    try:
        loaded = tf.saved_model.load(version_dir)
    except (tf.errors.OpError, DecodeError, IndexError, KeyError, ValueError, TypeError,
            AttributeError) as e:  # what a truncated or edited SavedModel raises on load
        raise Refused(version_dir, f"not a loadable SavedModel ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]})", "export it again "
                      "(export_main.py) or point --model at another version") from e
    export_info = {}
    info_path = files.join(version_dir, EXPORT_INFO_FILE)
    if files.isfile(info_path):
        with files.open_file(info_path) as f:
            export_info = json.load(f)
    stamp = _file_stamp([files.join(version_dir, "saved_model.pb"),
                         files.join(version_dir, "variables", "variables.index")])
    info = {"kind": "saved_model", "path": files.absolute(version_dir)}
    export_scales = tuple(export_info["scales"]) if "scales" in export_info else None
    if export_scales is not None or "max_image_size" in export_info:
        info["export"] = {"scales": list(export_scales) if export_scales else None,
                          "max_image_size": export_info.get("max_image_size")}
    min_size = int(export_info.get("min_image_size", MIN_IMAGE_SIZE))
    has_batched = "batched_global_descriptors" in loaded.signatures
    has_delg = "serving_default" in loaded.signatures
    scales = None if scales is None else check_scales(scales)
    at_export_scales = scales is None or bool(export_scales and same_scales(scales,
                                                                            export_scales))
    if has_batched and not at_export_scales and not has_delg:
        raise ValueError(
            f"SavedModel {version_dir} applies its export-time scales "
            f"{list(export_scales) if export_scales else '(unknown)'} in "
            f"batched_global_descriptors and has no serving_default signature to apply "
            f"scales={list(scales)}; leave scales unset or re-export with those scales")
    if has_batched and at_export_scales:
        sig = loaded.signatures["batched_global_descriptors"]

        def fn(images):
            return sig(input_images=tf.constant(images, tf.uint8))["global_descriptors"].numpy()

        info.update(signature="batched_global_descriptors",
                    scales=list(export_scales) if export_scales else None,
                    scales_source="export" if export_scales else "unknown (fixed at export)")
        return DescriptorBackend(fn=fn, scales=export_scales, info=info,
                                 min_image_size=min_size,
                                 fingerprint=f"savedmodel:{info['path']}:{stamp}:batched")
    if not has_delg:
        raise ValueError(f"SavedModel {version_dir} has neither a 'batched_global_descriptors' "
                         f"nor a 'serving_default' signature (has {list(loaded.signatures)})")
    scales = DEFAULT_SCALES if scales is None else scales
    if has_batched:
        logging.info("SavedModel %s applies scales %s in batched_global_descriptors; scales "
                     "%s were asked for, so descriptors come from serving_default, one image "
                     "per call", version_dir,
                     list(export_scales) if export_scales else "(unknown)", list(scales))
    sig = loaded.signatures["serving_default"]
    aggregation = export_info.get("scale_aggregation", "mean")
    scales_t = tf.constant(scales, tf.float32)
    ind_t = tf.range(len(scales), dtype=tf.int32)

    def fn_delg(images):
        rows = []
        for image in images:  # the DELG signature takes one image
            out = sig(input_image=tf.constant(image, tf.uint8), input_scales=scales_t,
                      input_global_scales_ind=ind_t)["global_descriptors"].numpy()
            rows.append(delg_client_descriptor(out, aggregation))
        return np.stack(rows).astype(np.float32)

    info.update(signature="serving_default", scales=list(scales), scales_source="client",
                client_rule="L2 per scale, max, L2" if aggregation == "max"
                else "L2 per scale, sum, L2")
    return DescriptorBackend(fn=fn_delg, scales=scales, info=info, min_image_size=min_size,
                             fingerprint=f"savedmodel:{info['path']}:{stamp}:delg:{scales}")


def from_serving_module(module, *, info=None, fingerprint="module"):
    """A back-end over an in-process glam_tf.export serving module (batched signature)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def fn(images):
        out = module.batched_global_descriptors(tf.constant(images, tf.uint8))
        return out["global_descriptors"].numpy()

    scales = tuple(float(s) for s in module.config.scales)
    info = dict(info or {"kind": "module"}, signature="batched_global_descriptors",
                scales=list(scales), scales_source="module")
    return DescriptorBackend(fn=fn, scales=scales, info=info,
                             fingerprint=f"{fingerprint}:{scales}",
                             min_image_size=int(module.config.min_image_size))


def from_keras_model(model, *, scales=None, max_image_size=DEFAULT_MAX_IMAGE_SIZE, info=None,
                     fingerprint="model", inference=None):
    """A back-end over an in-memory Keras descriptor model, through its serving module
    (glam_tf.export.build_serving_module: the functions the SavedModel exports) at `scales`
    (None: DEFAULT_SCALES). The client resizes full images to `max_image_size`; the module
    is built for that size, so its limits (max_scaled_pixels) are checked against what the
    client will send before any image is read. `inference`: an ExportConfig whose inference
    options (GeM p, regional GeM, scale aggregation) the module applies (None: none)."""
    from glam_tf import export  # pylint: disable=import-outside-toplevel

    scales = check_scales(DEFAULT_SCALES if scales is None else scales)
    config = (inference or ExportConfig()).for_evaluation(scales=scales,
                                                          max_image_size=max_image_size)
    module = export.build_serving_module(model, config)
    options = config.inference_changes()
    if options:
        info = dict(info or {"kind": "module"}, inference=options)
        fingerprint += ":" + ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    backend = from_serving_module(module, info=info, fingerprint=fingerprint)
    backend.keras_model = model
    return backend


def load_checkpoint(train_dir, *, scales=None, max_image_size=DEFAULT_MAX_IMAGE_SIZE,
                    inference=None):
    """A back-end from a training directory: model_config.json + newest checkpoint.

    Rebuilds the descriptor model (weights "none"), restores `model` from the checkpoint
    (expect_partial: optimizer state etc. ignored; every model weight must be found) and
    wraps it as `from_keras_model` (with the `inference` options); scales=None means
    DEFAULT_SCALES.
    """
    from glam_tf import export  # pylint: disable=import-outside-toplevel

    model, config, prefix = export.restore_descriptor_model(train_dir)
    stamp = _file_stamp([prefix + ".index", model_config_path(train_dir)])
    info = {"kind": "checkpoint", "path": files.absolute(prefix),
            "model_config": config.to_dict()}
    return from_keras_model(model, scales=scales, max_image_size=max_image_size, info=info,
                            fingerprint=f"checkpoint:{files.absolute(prefix)}:{stamp}",
                            inference=inference)


def build_backend(*, model=None, train_dir=None, scales=None,
                  max_image_size=DEFAULT_MAX_IMAGE_SIZE, inference=None):
    """The back-end for a SavedModel path (`model`) or a training directory (`train_dir`).

    scales=None: the model's own (a SavedModel's export-time scales, else DEFAULT_SCALES).
    inference: an ExportConfig whose inference options apply to a training directory (a
    SavedModel's are fixed at export).
    """
    err = check_model_source(model, train_dir)
    if err:
        raise ValueError(err)
    if model:
        if inference is not None and inference.inference_changes():
            raise ValueError(f"inference options {inference.inference_changes()} apply to a "
                             "training directory; a SavedModel's are fixed at export")
        return load_saved_model(model, scales=scales)
    return load_checkpoint(train_dir, scales=scales, max_image_size=max_image_size,
                           inference=inference)
