"""ExportConfig: the settings of the exported serving signatures (and their limits)."""

from __future__ import annotations

import dataclasses

from glam_tf.config import contract
from glam_tf.config.settings import (check, fail, integer, number, numbers_list, one_of,
                                     setting, to_json)

# Compute precisions of the exported signatures (glam_tf.export.precision says what runs in
# which precision and why).
EXPORT_PRECISIONS = ("float32", "bfloat16", "float16")
# How the fixed-scale signatures combine their per-scale unit descriptors.
SCALE_AGGREGATIONS = ("mean", "max")
# The inference-time options (training-free, SuperGlobal): what an evaluation of a training
# directory may set too (EvalConfig nests these fields).
INFERENCE_OPTIONS = ("inference_gem_p", "regional_gem", "scale_aggregation")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the SavedModel's signatures compute and what they refuse.

    max_scaled_pixels: 2**23 px (e.g. 2896 x 2896 = a 2048-px image at scale sqrt(2), or
    4096 x 2048). Above it the (hw)^2 global spatial attention and the backbone activations
    grow to many GiB.
    max_batch_pixels: 4x the largest single image (four 2896 x 2896, or sixteen 1024 x 1024
    images at scale sqrt(2)), so one request costs at most about four times what the
    largest single image does.
    max_decoded_pixels: 2**27 px (134 MP; decoding and resizing one costs at most ~1.05 GB,
    a progressive 4:4:4 JPEG, bench/decode_cost.py) passes 100-MP
    medium-format photos (11648 x 8736) and 108-MP phone photos (12000 x 9000); 200-MP
    phone full-resolution shots must be downsized first.
    max_image_bytes: a 100-MP JPEG at top quality (~0.5 byte/px) is ~50 MB.
    max_images_per_request: 8 images in global_descriptor_from_bytes, each described at
    max_image_size and the scales (3.5 x 1024^2 px of network input for the defaults): 8 of
    them are 29 MP, the work of one max_batch_pixels batch; each is decoded on its own, so
    memory does not grow with the count.
    max_scales_per_request: 16 entries of serving_default's input_scales (and of
    input_global_scales_ind: each scale is described once). DELG's clients send 7 (0.25 to
    2); the selected scaled images together are also bounded by max_batch_pixels.
    Every count is checked before anything sized by it is allocated.
    """

    scales: tuple = setting(contract.DEFAULT_SCALES, "Image scales of the global_descriptor, "
                            "batched and from_bytes signatures (serving_default takes its "
                            "scales per request).", rule=numbers_list(), kind="floats",
                            fix=f"The paper uses {','.join(map(str, contract.DEFAULT_SCALES))}.")
    max_image_size: int = setting(contract.DEFAULT_MAX_IMAGE_SIZE, "Longer side (px) the "
                                  "global_descriptor signatures resize images to.",
                                  rule=integer(contract.MIN_IMAGE_SIZE))
    max_scaled_pixels: int = setting(2**23, "Largest scaled image (h * w) any signature "
                                     "accepts.", rule=integer(contract.MIN_IMAGE_SIZE**2))
    max_batch_pixels: int = setting(2**25, "Largest batched_global_descriptors request, B * h "
                                    "* w at the largest scale, and largest serving_default "
                                    "request, the selected scaled images' pixels summed "
                                    "(>= max_scaled_pixels).",
                                    rule=integer(1))
    max_decoded_pixels: int = setting(2**27, "Largest image (height * width, read from its "
                                      "encoded header before decoding) "
                                      "global_descriptor_from_bytes decodes.",
                                      rule=integer(1))
    max_image_bytes: int = setting(64 * 2**20, "Largest encoded image "
                                   "global_descriptor_from_bytes accepts, bytes (< 2**31, a "
                                   "tf.string offset).", rule=integer(1, 2**31 - 1))
    max_images_per_request: int = setting(8, "Most images in one "
                                          "global_descriptor_from_bytes request.",
                                          rule=integer(1))
    max_scales_per_request: int = setting(16, "Most entries of serving_default's "
                                          "input_scales and input_global_scales_ind in one "
                                          "request (DELG sends 7).", rule=integer(1))
    precision: str = setting("float32", "Compute precision of the exported signatures: "
                             "float32; bfloat16 (CPUs with AVX512-BF16/AMX, TPUs, recent "
                             "GPUs); float16 (GPUs only: no faster on CPUs). Softmaxes, GeM and "
                             "the head stay float32; inputs and float32 unit outputs are "
                             "the same.", rule=one_of(EXPORT_PRECISIONS),
                             fix="Use bfloat16 on a CPU with AVX512-BF16 or AMX, a TPU or a "
                             "recent GPU, float16 on a GPU, float32 elsewhere.")
    inference_gem_p: float = setting(0.0, "GeM exponent at inference instead of the trained "
                                     "one (SuperGlobal: ~4.6 beats a trained 3 for ArcFace "
                                     "models); 0 = the trained p.", rule=number(0.0),
                                     fix="Use 0 (the trained p) or a value >= 1.")
    regional_gem: bool = setting(False, "Regional GeM before GeM: each position of the "
                                 "attended feature map averaged with the L^2.5 pool of its "
                                 "5x5 neighbourhood (reflection padding).")
    scale_aggregation: str = setting("mean", "How the fixed-scale signatures combine the "
                                     "per-scale unit descriptors before the final L2: mean "
                                     "(the paper) or max (element-wise maximum, SuperGlobal).",
                                     rule=one_of(SCALE_AGGREGATIONS))
    warmup_requests: bool = setting(True, "Write assets.extra/tf_serving_warmup_requests: "
                                    "one request per signature at max_image_size, which TF "
                                    "Serving replays at load so that the first user request "
                                    "does not pay for the session's first run.")
    min_image_size: int = setting(contract.MIN_IMAGE_SIZE, "Smallest scaled side accepted "
                                  "(the backbone needs 32 px).", rule=integer(1), flag="")

    def validate(self, names=None) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value."""
        names = names or {}
        name = lambda field: names.get(field, field)  # noqa: E731
        check(self, names)
        if 0 < self.inference_gem_p < 1:
            fail(name("inference_gem_p"), "must be 0 (the trained p) or >= 1 (1 = average "
                 "pooling)", self.inference_gem_p)
        smallest = round(self.max_image_size * min(self.scales))
        if smallest < self.min_image_size:
            fail(name("max_image_size"), f"at the smallest scale {min(self.scales)} gives a "
                 f"{smallest}-px longer side, below the model's minimum of "
                 f"{self.min_image_size} px", self.max_image_size,
                 "Raise it or the smallest scale.")
        if self.max_batch_pixels < self.max_scaled_pixels:
            fail(name("max_batch_pixels"), f"must be >= max_scaled_pixels = "
                 f"{self.max_scaled_pixels} (a batch of one image at the largest size)",
                 self.max_batch_pixels)
        largest = round(self.max_image_size * max(self.scales))
        if largest * largest > self.max_scaled_pixels:
            fail(name("max_image_size"), f"at the largest scale {max(self.scales)} allows "
                 f"{largest}x{largest} = {largest * largest} px, over max_scaled_pixels="
                 f"{self.max_scaled_pixels}", self.max_image_size,
                 "Lower it or the largest scale, or raise max_scaled_pixels.")

    def info(self) -> dict:
        """The settings as recorded in the SavedModel's glam_export.json."""
        return to_json(self)

    def inference_changes(self) -> dict:
        """{field: value} of the inference options (INFERENCE_OPTIONS) set away from their
        defaults: what an evaluation records of them, and refuses for a SavedModel."""
        default = ExportConfig()
        return {f: getattr(self, f) for f in INFERENCE_OPTIONS
                if getattr(self, f) != getattr(default, f)}

    def for_evaluation(self, *, scales, max_image_size) -> "ExportConfig":
        """The serving module an evaluation builds around a Keras model: these inference
        options at `scales` and `max_image_size`, every request limit at its default (the
        evaluation client sends what it resized itself). Validated."""
        config = ExportConfig(scales=tuple(float(s) for s in scales),
                              max_image_size=max_image_size,
                              **{f: getattr(self, f) for f in INFERENCE_OPTIONS})
        config.validate()
        return config
