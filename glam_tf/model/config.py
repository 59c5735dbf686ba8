"""ModelConfig: every architectural choice of the GLAM descriptor model, validated in one place.

Values follow /work/shared/GLAM_SPEC.md; the (inferred) ones (c' = 256, GeM p = 3,
dropout 0) are fields so they stay flags.
"""

from __future__ import annotations

import dataclasses
import numbers

VARIANTS = (
    "baseline",
    "local-channel",
    "local-spatial",
    "local",
    "global-channel",
    "global-spatial",
    "global",
    "global+local",
)
BACKBONES = ("resnet50", "resnet101", "resnet152")
WEIGHTS_KEYWORDS = ("imagenet", "none")


class ConfigError(ValueError):
    """A ModelConfig field breaks its rule; the message names field, rule, value and fix."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(field: str, rule: str, value, fix: str):
    raise ConfigError(f"ModelConfig.{field} {rule}; received {field}={value!r}. {fix}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the descriptor model (backbone -> GLAM -> GeM -> head).

    Attributes:
        backbone: one of BACKBONES (keras.applications ResNet, conv5 output, c = 2048).
        weights: "imagenet" (Keras cache ~/.keras/models or download), "none" (random
            init) or a path to a Keras .h5 weights file of the chosen backbone (no top).
        variant: one of VARIANTS, the rows of the paper's Table 5.
        reduced_channels: c', channels of the local/global spatial attention branches.
        kernel_size: k of the 1-D convolutions along channels (odd).
        dilations: dilation rates of the 3x3 convs of local spatial attention.
        gem_p: initial GeM exponent (learnable).
        gem_eps: GeM clamp.
        embedding_dim: descriptor size D.
        dropout: dropout rate before the embedding Dense layer.
        zero_init_attention: initialise the output 1x1 convs of local and global spatial
            attention to zero, so eqs. 2 and 6 start as their residual identity (F^l =
            F_c^l, F^g = F_c^g) as non-local blocks do. The paper does not state its
            initialisation; False keeps the Keras default. From random init the unbounded
            spatial maps otherwise start as products of random features (|F|^2 terms of
            random sign) and slow training down; the demo sets it.
        zero_init_residual: initialise the last BatchNorm scale (gamma) of every
            bottleneck block of the backbone to zero, so each block starts as its shortcut
            and the random ResNet starts shallow (Goyal et al. 2017, "Accurate, large
            minibatch SGD"; torchvision's `zero_init_residual`). Only with weights "none":
            loaded weights would overwrite it. The demo sets it: there GLAM's loss is 3.48
            at step 100 with it, 3.96 without (ln 50 = 3.91: still on the plateau).
    """

    backbone: str = "resnet101"
    weights: str = "imagenet"
    variant: str = "global+local"
    reduced_channels: int = 256
    kernel_size: int = 3
    dilations: tuple = (1, 2, 3)
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    embedding_dim: int = 512
    dropout: float = 0.0
    zero_init_attention: bool = False
    zero_init_residual: bool = False

    def validate(self) -> None:
        """Raises ConfigError (a ValueError) naming the first bad field, its rule and value."""
        if self.backbone not in BACKBONES:
            _fail("backbone", f"must be one of {BACKBONES}", self.backbone,
                  "Use e.g. --backbone=resnet101.")
        if not isinstance(self.weights, str) or not self.weights:
            _fail("weights", "must be 'imagenet', 'none' or a path to a .h5 file",
                  self.weights, "Pass a string, e.g. --weights=none.")
        if self.weights not in WEIGHTS_KEYWORDS and not self.weights.endswith(".h5"):
            _fail("weights", "must be 'imagenet', 'none' or a path ending in '.h5'",
                  self.weights,
                  "Use --weights=imagenet, --weights=none, or the path of a Keras .h5 "
                  "weights file of the backbone without its top.")
        if self.variant not in VARIANTS:
            _fail("variant", f"must be one of {VARIANTS}", self.variant,
                  "Use e.g. --variant=global+local (GLAM) or --variant=baseline.")
        if not _is_int(self.reduced_channels) or self.reduced_channels < 1:
            _fail("reduced_channels", "must be a positive integer (c' of the spec)",
                  self.reduced_channels, "The spec's default is 256.")
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            _fail("kernel_size", "must be a positive odd integer (same-padded 1-D conv)",
                  self.kernel_size, "The spec's default is 3.")
        if (not isinstance(self.dilations, (tuple, list)) or not self.dilations
                or not all(_is_int(d) and d >= 1 for d in self.dilations)):
            _fail("dilations", "must be a non-empty tuple of positive integers",
                  self.dilations, "The spec's default is (1, 2, 3).")
        if not _is_real(self.gem_p) or not self.gem_p >= 1:
            _fail("gem_p", "must be a number >= 1 (GeM spans average to max pooling)",
                  self.gem_p,
                  "The spec's default is 3.0 (1 is average pooling).")
        if not _is_real(self.gem_eps) or not self.gem_eps > 0:
            _fail("gem_eps", "must be a number > 0", self.gem_eps,
                  "The spec's default is 1e-6.")
        if not _is_int(self.embedding_dim) or self.embedding_dim < 1:
            _fail("embedding_dim", "must be a positive integer", self.embedding_dim,
                  "The spec's default is 512.")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", "must be a number in [0, 1)", self.dropout,
                  "The spec's default is 0.0.")
        if not isinstance(self.zero_init_attention, bool):
            _fail("zero_init_attention", "must be a bool", self.zero_init_attention,
                  "Use --zero_init_attention or --nozero_init_attention.")
        if not isinstance(self.zero_init_residual, bool):
            _fail("zero_init_residual", "must be a bool", self.zero_init_residual,
                  "Use --zero_init_residual or --nozero_init_residual.")
        if self.zero_init_residual and self.weights != "none":
            _fail("zero_init_residual", "applies to random initialisation only (weights "
                  f"{self.weights!r} would overwrite it)", self.zero_init_residual,
                  "Use --weights=none with --zero_init_residual, or leave it off.")

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict; missing keys take defaults, unknown keys raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"ModelConfig.from_dict expects a dict; received {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"ModelConfig.from_dict: unknown field(s) {unknown}; known fields are "
                f"{sorted(known)}. Remove them or check the spelling.")
        kwargs = dict(d)
        if "dilations" in kwargs and isinstance(kwargs["dilations"], list):
            kwargs["dilations"] = tuple(kwargs["dilations"])
        return cls(**kwargs)
