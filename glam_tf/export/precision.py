"""The descriptor model rebuilt to compute in bfloat16 or float16 for export.

`with_precision(model, "bfloat16")` clones a float32 Keras descriptor model layer by layer
under the Keras dtype policy "mixed_bfloat16" (float32 variables holding the same values,
bfloat16 compute); "float16" uses "mixed_float16"; "float32" returns the model itself, so a
float32 export is the default export, bit for bit.

What runs in which precision, and why (docs/serving.md, "Export precision", has the measurements):

- Preprocessing, backbone convolutions, ReLUs and residual adds, the GLAM convolutions and
  the attention products: low precision. They are ~all of the compute, and each output is
  a sum of many products whose rounding errors (2^-8 relative in bfloat16, 2^-11 in
  float16) average out. Integer RGB values 0..255 are exact in both formats.
- BatchNormalization: float32 inside (Keras 3 upcasts bfloat16/float16 inputs), output in
  the compute dtype (an affine map at inference).
- Global spatial attention (attention.GlobalSpatialAttention): logits K_m . Q_n and the
  softmax over the (hw) keys in float32, as the layer always does: unscaled dot products
  over c' channels reach hundreds, where bfloat16's 8-bit mantissa rounds a logit by a
  whole unit (a factor e in the weight), and float16's exp overflows above 11.
- Global channel attention: the exp(kappa_i q_j) series and its (hw x C) products in
  float32 (the layer always does): the softmax numerator and denominator are sums of C =
  2048 positive terms, and the 1/n! terms of the series fall below float16's range.
- Local channel attention's sigmoid gate and the local spatial map: low precision (a gate
  in (0, 1) and a map multiplied into the features: relative errors, no range issue).
- Fusion softmax (glam.GlamModule): float32, from the float32 beta (not autocast), three
  scalars: free.
- GeM (pooling.GeM): float32 (its input is upcast; the log-space sum over hw positions
  needs float32; p is read in float32, not autocast), and its output stays float32.
- Head (head.EmbeddingHead: Dense 2048 -> 512, BatchNorm, L2 normalisation) and any
  UnitNormalization or Softmax layer: float32. The head is ~1 M multiply-adds against
  ~10^11 in the backbone, and a bfloat16 descriptor would be rounded to 3 significant
  digits before the normalisation: the unit descriptor must be float32.
"""

from __future__ import annotations

import dataclasses

import keras

from glam_tf.config.export import EXPORT_PRECISIONS
from glam_tf.model.head import EmbeddingHead
from glam_tf.model.pooling import GeM, RegionalGeM

# export precision -> Keras dtype policy of the low-precision layers
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
assert tuple(POLICIES) == EXPORT_PRECISIONS



@dataclasses.dataclass(frozen=True)
class Measured:
    """A bfloat16 export's speed-up over float32 (float32 time / bfloat16 time; > 1 is
    faster) by wall clock and by process CPU time, and the CPU it was measured on."""

    cpu: str
    wall: float
    cpu_time: float


# bench/export_precision.py (ResNet101 GLAM, global_descriptor of one 768x1024 image) per
# instruction-set level of glam_tf.cpu; levels not listed were not measured. README
# "Export precision" has the commands and loads.
BFLOAT16_MEASURED = {
    "AVX512-BF16": Measured("AMD EPYC family 25 model 17 (Zen 4), 2 shared cores", 1.72, 1.63),
    "AVX2": Measured("AMD EPYC Zen 3 (no AVX-512), 2 cores", 1.06, 0.85),
}


def _measured(level):
    m = BFLOAT16_MEASURED[level]
    return (f"measured on {level} ({m.cpu}): {m.wall:.2f}x float32's speed by wall clock, "
            f"{m.cpu_time:.2f}x by CPU time")


def precision_advice(precision: str, cpu_info) -> tuple[bool, str] | None:
    """What to expect of an export in `precision` on this CPU (a glam_tf.cpu.CpuInfo).

    Returns:
        (warn, message): warn is True where the precision is measured to gain nothing on a
        CPU like this one; None for float32.
    """
    here = f"this CPU ({cpu_info.describe()})"
    choose = ("Choose the precision on the serving machine: python bench/export_precision.py "
              "measures it there.")
    if precision == "float32":
        return None
    if precision == "float16":
        return (False, f"export precision float16: {here}: float16 is a GPU option; on CPUs "
                "it was measured no faster than float32 (0.84x by CPU time on AVX512-BF16). "
                + choose)
    if cpu_info.native_bfloat16:
        level = "AVX512-BF16" if cpu_info.isa_level == "AMX" else cpu_info.isa_level
        extra = ("; AMX itself not measured yet, expect at least as much"
                 if cpu_info.isa_level == "AMX" else "")
        return (False, f"export precision bfloat16: {here} computes bfloat16 natively "
                f"(avx512_bf16 / amx_bf16); {_measured(level)}{extra}. {choose}")
    return (True, f"export precision bfloat16: {here} has no native bfloat16 (no avx512_bf16 "
            f"or amx_bf16 flag), so TensorFlow emulates it: {_measured('AVX2')}: no gain, "
            f"more CPU. If the serving machine has AVX512-BF16 or AMX bfloat16 pays there; "
            f"otherwise export float32. {choose}")


# Layers that keep the float32 policy in a low-precision clone (see the module docstring).
FLOAT32_LAYERS = (GeM, RegionalGeM, EmbeddingHead, keras.layers.UnitNormalization, keras.layers.Softmax)


def layer_policy(layer, precision: str) -> str:
    """The dtype policy name `layer` gets in the `precision` clone."""
    if isinstance(layer, FLOAT32_LAYERS):
        return "float32"
    return POLICIES[precision]


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """`model` computing in `precision` (float32 variables, same values, float32 output).

    Args:
        model: a functional keras.Model in float32 (e.g. build_descriptor_model's); nested
            functional or Sequential models (the backbone) are cloned too.
        precision: one of EXPORT_PRECISIONS. "float32" returns `model` itself.

    Returns:
        keras.Model with the same inputs, variables (copies) and float32 output.

    Raises:
        ValueError: an unknown precision, or a model that cannot be cloned (a subclassed
            keras.Model: export it in float32 or build it under the policy yourself).
    """
    if precision not in POLICIES:
        raise ValueError(f"--precision must be one of {', '.join(EXPORT_PRECISIONS)}; "
                         f"received --precision={precision!r}.")
    if precision == "float32":
        return model

    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = layer_policy(layer, precision)
        return type(layer).from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except ValueError as e:
        raise ValueError(f"precision={precision!r} rebuilds the model layer by layer "
                         f"(keras.models.clone_model), which failed: {e}") from None
    source, target = model.weights, clone.weights
    if [w.path for w in source] != [w.path for w in target]:
        raise ValueError(f"the {precision} clone of model {model.name!r} has other weights "
                         "than the model (names or order differ); cannot copy them.")
    for src, dst in zip(source, target):
        dst.assign(src)
    return clone
