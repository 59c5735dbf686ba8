"""SavedModel export of the GLAM descriptor model (TF Serving / DELG-compatible signatures)."""

from glam_tf.config.contract import latest_checkpoint, next_version, resolve_version
from glam_tf.export.checkpoint import (
    export_from_checkpoint,
    read_model_config,
    restore_descriptor_model,
)
from glam_tf.export.serving import (
    SIGNATURE_NAMES,
    GlamServingModule,
    build_serving_module,
    export_config,
    export_saved_model,
)

__all__ = [
    "SIGNATURE_NAMES", "GlamServingModule", "build_serving_module", "export_config",
    "export_from_checkpoint", "export_saved_model", "latest_checkpoint", "next_version",
    "read_model_config", "resolve_version", "restore_descriptor_model",
]
