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
import os

import numpy as np

DEFAULT_SCALES = (0.70710678, 1.0, 1.41421356)
MIN_IMAGE_SIZE = 32  # the backbone needs 32 px per side at every scale
_EXPORT_INFO = os.path.join("assets.extra", "glam_export.json")


@dataclasses.dataclass
class DescriptorBackend:
    """A batch descriptor function and what the report needs to know about it.

    Attributes:
        fn: uint8 (B, H, W, 3) same-size images -> (B, D) float32 unit rows.
        scales: the scales the model applies (None when unknown).
        info: JSON-able description for the report (kind, path, signature, ...).
        fingerprint: identifies model + settings, so cached features are not mixed up.
        min_image_size: smallest side the model accepts at any scale.
    """

    fn: object
    scales: tuple
    info: dict
    fingerprint: str
    min_image_size: int = MIN_IMAGE_SIZE

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


def check_scales(scales):
    """Scales as a tuple of finite positive floats; ValueError naming `scales` otherwise."""
    try:
        out = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be numbers, e.g. 0.7071,1,1.4142; got {scales!r}") from None
    if not out or not all(math.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"scales must be a non-empty list of finite numbers > 0; got {scales!r}")
    return out


def resolve_saved_model_dir(path):
    """The SavedModel folder: `path` itself if it holds saved_model.pb, else its newest
    numbered version folder (as TF Serving picks). FileNotFoundError explains otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(n) for n in os.listdir(path)
                       if n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb"))))
    if not versions:
        raise FileNotFoundError(f"{path!r} is not a SavedModel: no saved_model.pb in it nor in "
                                "a numbered version folder (<model>/<version>/saved_model.pb)")
    return os.path.join(path, str(versions[-1]))


def check_model_source(model=None, train_dir=None):
    """Exactly one of a SavedModel path and a training directory, each with its files.

    Returns an error message (naming `model` or `train_dir`) or None when fine.
    """
    if bool(model) == bool(train_dir):
        return ("give exactly one of model (a SavedModel directory) and train_dir (a training "
                f"directory with model_config.json and checkpoints/); got model={model!r}, "
                f"train_dir={train_dir!r}")
    if model:
        try:
            resolve_saved_model_dir(model)
        except FileNotFoundError as e:
            return f"model: {e}"
        return None
    missing = [p for p in (os.path.join(train_dir, "model_config.json"),
                           os.path.join(train_dir, "checkpoints")) if not os.path.exists(p)]
    if missing:
        return f"train_dir: {train_dir!r} lacks {', '.join(missing)}"
    return None


def _file_stamp(paths):
    h = hashlib.sha1()
    for p in paths:
        if os.path.exists(p):
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _normalize_rows(x, axis=-1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def delg_client_descriptor(per_scale):
    """DELG client rule: (S, D) per-scale rows -> (D,): L2 each row, sum, L2."""
    return _normalize_rows(np.sum(_normalize_rows(np.asarray(per_scale, np.float64)), axis=0))


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

    version_dir = resolve_saved_model_dir(path)
    loaded = tf.saved_model.load(version_dir)
    export_info = {}
    info_path = os.path.join(version_dir, _EXPORT_INFO)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            export_info = json.load(f)
    stamp = _file_stamp([os.path.join(version_dir, "saved_model.pb"),
                         os.path.join(version_dir, "variables", "variables.index")])
    info = {"kind": "saved_model", "path": os.path.abspath(version_dir)}
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
    scales_t = tf.constant(scales, tf.float32)
    ind_t = tf.range(len(scales), dtype=tf.int32)

    def fn_delg(images):
        rows = []
        for image in images:  # the DELG signature takes one image
            out = sig(input_image=tf.constant(image, tf.uint8), input_scales=scales_t,
                      input_global_scales_ind=ind_t)["global_descriptors"].numpy()
            rows.append(delg_client_descriptor(out))
        return np.stack(rows).astype(np.float32)

    info.update(signature="serving_default", scales=list(scales), scales_source="client",
                client_rule="L2 per scale, sum, L2")
    return DescriptorBackend(fn=fn_delg, scales=scales, info=info, min_image_size=min_size,
                             fingerprint=f"savedmodel:{info['path']}:{stamp}:delg:{scales}")


def from_serving_module(module, *, info=None, fingerprint="module"):
    """A back-end over an in-process glam_tf.export serving module (batched signature)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def fn(images):
        out = module.batched_global_descriptors(tf.constant(images, tf.uint8))
        return out["global_descriptors"].numpy()

    scales = tuple(float(s) for s in module.scales)
    info = dict(info or {"kind": "module"}, signature="batched_global_descriptors",
                scales=list(scales), scales_source="module")
    return DescriptorBackend(fn=fn, scales=scales, info=info,
                             fingerprint=f"{fingerprint}:{scales}",
                             min_image_size=int(getattr(module, "min_image_size",
                                                        MIN_IMAGE_SIZE)))


def load_checkpoint(train_dir, *, scales=None, max_image_size=1024):
    """A back-end from a training directory: model_config.json + newest checkpoint.

    Rebuilds the descriptor model (weights "none"), restores `model` from the checkpoint
    (expect_partial: optimizer state etc. ignored; every model weight must be found) and
    wraps it with glam_tf.export.build_serving_module(scales, max_image_size); scales=None
    means DEFAULT_SCALES.
    """
    from glam_tf import export  # pylint: disable=import-outside-toplevel

    scales = check_scales(DEFAULT_SCALES if scales is None else scales)
    model, config, prefix = export.restore_descriptor_model(train_dir)
    module = export.build_serving_module(model, scales=scales, max_image_size=max_image_size)
    stamp = _file_stamp([prefix + ".index", os.path.join(train_dir, "model_config.json")])
    info = {"kind": "checkpoint", "path": os.path.abspath(prefix),
            "model_config": config.to_dict()}
    return from_serving_module(module, info=info,
                               fingerprint=f"checkpoint:{os.path.abspath(prefix)}:{stamp}")


def build_backend(*, model=None, train_dir=None, scales=None, max_image_size=1024):
    """The back-end for a SavedModel path (`model`) or a training directory (`train_dir`).

    scales=None: the model's own (a SavedModel's export-time scales, else DEFAULT_SCALES).
    """
    err = check_model_source(model, train_dir)
    if err:
        raise ValueError(err)
    if model:
        return load_saved_model(model, scales=scales)
    return load_checkpoint(train_dir, scales=scales, max_image_size=max_image_size)
