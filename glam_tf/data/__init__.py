"""Data: downloads (download), GLDv2 -> TFRecords (gldv2, also a tensorflow-datasets folder:
tfds_folder), training input pipeline (pipeline), synthetic landmarks.

Submodules load lazily, so `glam_tf.data.synthetic` (NumPy + Pillow only) does not pull in
TensorFlow; `from glam_tf.data import build_train_dataset` still works.
"""

import importlib

_EXPORTS = {
    "DecodeStats": "pipeline",
    "DamagedShardsError": "pipeline",
    "check_shards": "pipeline",
    "scan_shard": "framing",
    "build_train_dataset": "pipeline",
    "make_dataset_fn": "pipeline",
    "convert_gldv2": "gldv2",
    "read_gldv2_csv": "gldv2",
    "read_label_map": "gldv2",
    "ConversionSummary": "gldv2",
    "generate_synthetic_landmarks": "synthetic",
    "generate_if_absent": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
