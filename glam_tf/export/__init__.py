"""SavedModel export of the GLAM descriptor model (TF Serving / DELG-compatible signatures)."""

from glam_tf.export.checkpoint import (
    export_from_checkpoint,
    latest_checkpoint,
    read_model_config,
    restore_descriptor_model,
)
from glam_tf.export.serving import (
    DEFAULT_MAX_BATCH_PIXELS,
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_SIZE,
    DEFAULT_MAX_SCALED_PIXELS,
    DEFAULT_SCALES,
    MIN_IMAGE_SIZE,
    SIGNATURE_NAMES,
    GlamServingModule,
    build_serving_module,
    export_saved_model,
    next_version,
    resolve_version,
    validate_export_args,
)

__all__ = [
    "DEFAULT_MAX_BATCH_PIXELS", "DEFAULT_MAX_DECODED_PIXELS", "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_SIZE", "DEFAULT_MAX_SCALED_PIXELS", "DEFAULT_SCALES", "MIN_IMAGE_SIZE",
    "SIGNATURE_NAMES", "GlamServingModule", "build_serving_module", "export_from_checkpoint",
    "export_saved_model", "latest_checkpoint", "next_version", "read_model_config",
    "resolve_version", "restore_descriptor_model", "validate_export_args",
]
