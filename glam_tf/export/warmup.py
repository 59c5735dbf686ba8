"""TF Serving warm-up file of an export: one PredictRequest per signature at its image size.

TF Serving replays `assets.extra/tf_serving_warmup_requests` (a TFRecord of
tensorflow.serving.PredictionLog) when it loads a version, before the version takes
traffic, so the first user request does not pay for the session's first run of each
signature (graph optimisation, kernel and thread-pool set-up). The requests are made from
the export's SignatureDefs (glam_tf.export.requests) on one synthetic photo-sized image
whose longer side is the export's max_image_size (aspect 3:4, or squarer where the shorter
side would fall under the minimum at the smallest scale), at the export's scales: the shapes
the signatures then see first are the ones real requests bring.

Every request must be one the export accepts: TF Serving does not load a version whose
warm-up request fails. ExportConfig.validate() guarantees it for the uint8 signatures (an
S x S image passes at every scale); the global_descriptor_from_bytes request is left out
when its JPEG would exceed max_image_bytes or max_decoded_pixels.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from absl import logging

from glam_tf import files
from glam_tf.config import ExportConfig
from glam_tf.export import requests

WARMUP_FILE = files.join("assets.extra", "tf_serving_warmup_requests")


def warmup_image(max_image_size: int, min_height: int = 1) -> np.ndarray:
    """A smooth uint8 [h, size, 3] image, h = 3/4 * size (at least min_height, at most size):
    gradients and a few rings, deterministic."""
    height = min(max_image_size, max(min_height, round(max_image_size * 3 / 4)))
    y, x = np.mgrid[0:height, 0:max_image_size].astype(np.float32)
    rings = 127.5 * (1 + np.sin(np.hypot(y - height / 2, x - max_image_size / 3) / 9.0))
    image = np.stack([255 * x / max_image_size, rings, 255 * y / height], axis=-1)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def warmup_inputs(config: ExportConfig) -> dict:
    """signature name -> its inputs for the warm-up request (export's size and scales)."""
    image = warmup_image(config.max_image_size,
                         math.ceil(config.min_image_size / min(config.scales)))
    jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
    inputs = {
        "serving_default": {
            "input_image": image,
            "input_scales": np.asarray(config.scales, np.float32),
            "input_global_scales_ind": np.arange(len(config.scales), dtype=np.int32)},
        "global_descriptor": {"input_image": image},
        "batched_global_descriptors": {"input_images": image[np.newaxis]},
    }
    if (len(jpeg) <= config.max_image_bytes
            and image.shape[0] * image.shape[1] <= config.max_decoded_pixels):
        inputs["global_descriptor_from_bytes"] = {"image_bytes": [jpeg]}
    return inputs


def write_warmup_requests(export_path, config: ExportConfig) -> str:
    """Writes `<export_path>/assets.extra/tf_serving_warmup_requests`; returns its path.

    One PredictionLog per signature of the export (in SignatureDef order) that
    warmup_inputs() has inputs for; the others are logged.
    """
    defs = requests.signature_defs(export_path)
    inputs = warmup_inputs(config)
    missing = sorted(set(defs) - set(inputs) - {"__saved_model_init_op"})
    if missing:
        logging.info("No warm-up request for %s (the export's limits refuse the warm-up "
                     "image)", ", ".join(missing))
    path = files.join(export_path, WARMUP_FILE)
    files.makedirs(files.dirname(path))
    requests.write_prediction_logs(path, [requests.predict_request(defs, name, inputs[name])
                                          for name in defs if name in inputs])
    return path
