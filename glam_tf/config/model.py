"""ModelConfig: every architectural choice of the GLAM descriptor model, validated in one place.

Values follow GLAM_SPEC.md; the (inferred) ones (c' = 256, GeM p = 3, dropout 0) are
settings so they stay flags.
"""

from __future__ import annotations

import dataclasses

from glam_tf.config.settings import (SettingError, check, fail, integer, number, numbers_list,
                                     one_of, setting, to_json)

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
# Scaling of the global spatial attention logits K_m . Q_n before their softmax.
LOGIT_SCALES = ("none", "sqrt")
LOCAL_ACTIVATIONS = ("none", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the descriptor model (backbone -> GLAM -> GeM -> head).

    zero_init_attention: the paper does not state its initialisation; False keeps the
    Keras default. From random init the unbounded spatial maps otherwise start as products
    of random features (|F|^2 terms of random sign) and slow training down; the demo sets
    it. zero_init_residual (Goyal et al. 2017, "Accurate, large minibatch SGD";
    torchvision's `zero_init_residual`): in the demo GLAM's loss is 3.48 at step 100 with
    it, 3.96 without (ln 50 = 3.91: still on the plateau).

    fusion_identity_weight, fusion_lr_multiplier, global_spatial_logit_scale,
    local_spatial_activation: the paper fixes none of the first three and puts no
    activation on A_s^l; the defaults (equal fusion weights, beta learned at the network's
    rate, unscaled logits, no activation) are the spec's module. In the demo the fusion weights end
    within 0.007 of their initialisation after 320 AdamW steps at 1e-3, and G_s is
    one-hot (unscaled dot products over c' = 256 channels).
    """

    backbone: str = setting("resnet101", "keras.applications ResNet backbone (conv5 output, "
                            "c = 2048).", rule=one_of(BACKBONES),
                            fix="Use e.g. --backbone=resnet101.")
    weights: str = setting("imagenet", "Backbone init: 'imagenet' (Keras cache "
                           "~/.keras/models or download), 'none' (random) or the path (local or "
                           "gs://...) of a weights file of the backbone: keras.applications' "
                           ".h5 with or without top, or a .weights.h5 this project saved "
                           "(bench/pretrain_backbone.py).")
    variant: str = setting("global+local", "GLAM variant (paper Table 5 rows); "
                           "'global+local' is GLAM, 'baseline' has no attention module.",
                           rule=one_of(VARIANTS),
                           fix="Use e.g. --variant=global+local (GLAM) or --variant=baseline.")
    reduced_channels: int = setting(256, "c', channels of the local/global spatial attention "
                                    "branches.", rule=integer(1),
                                    fix="The spec's default is 256.")
    kernel_size: int = setting(3, "k of the 1-D convolutions along channels (odd: "
                               "same-padded).", rule=integer(1),
                               fix="The spec's default is 3.")
    dilations: tuple = setting((1, 2, 3), "Dilations of the local spatial attention 3x3 "
                               "convs.", rule=numbers_list(ints=True), kind="ints",
                               fix="The spec's default is 1,2,3.")
    gem_p: float = setting(3.0, "Initial (learnable) GeM exponent; >= 1 (1: average "
                           "pooling).", rule=number(1.0),
                           fix="The spec's default is 3.0 (1 is average pooling).")
    gem_eps: float = setting(1e-6, "GeM clamp of the features.", rule=number(0.0,
                                                                                low_open=True),
                             fix="The spec's default is 1e-6.")
    embedding_dim: int = setting(512, "Descriptor dimension D.", rule=integer(1),
                                 fix="The spec's default is 512.")
    dropout: float = setting(0.0, "Dropout rate before the embedding layer.",
                             rule=number(0.0, 1.0, high_open=True),
                             fix="The spec's default is 0.0.")
    zero_init_attention: bool = setting(
        False, "Start the output convs of local and global spatial attention at zero (eqs. "
        "2 and 6 start as identity); for training from random init.")
    fusion_identity_weight: float = setting(
        0.0, "Initial fusion weight w of F itself (the branches share the rest equally), "
        "so the module starts close to the identity and learns the branches in; 0: equal "
        "weights (beta = 0, the spec).", rule=number(0.0, 1.0, high_open=True),
        fix="Use 0 (equal weights) or a weight below 1, e.g. 0.8.")
    fusion_lr_multiplier: float = setting(
        1.0, "The fusion logits beta move this many times faster than other weights "
        "(beta = m * stored beta'; under Adam/AdamW a step moves beta' by ~lr), since "
        "at the network's rate they barely leave their initialisation.",
        rule=number(0.0, low_open=True), fix="The default 1.0 learns beta like any "
        "other weight; e.g. 10 or 100 moves it faster.")
    global_spatial_logit_scale: str = setting(
        "none", "Global spatial attention logits K.Q: 'none' (the spec) or 'sqrt' "
        "(divided by sqrt(c') as in transformers, so the softmax over positions is "
        "less likely to saturate to one-hot).", rule=one_of(LOGIT_SCALES),
        fix="Use --global_spatial_logit_scale=none or =sqrt.")
    local_spatial_activation: str = setting(
        "none", "Activation of the local spatial map A_s^l: 'none' (the spec: unbounded, "
        "F^l = F_c^l (1 + A)) or 'sigmoid' (A in (0, 1): a position is kept at 1x to 2x, "
        "never sign-flipped or scaled by hundreds).", rule=one_of(LOCAL_ACTIVATIONS),
        fix="Use --local_spatial_activation=none or =sigmoid.")
    zero_init_residual: bool = setting(
        False, "Start every bottleneck block of the backbone as its shortcut (last "
        "BatchNorm gamma 0); with --weights=none only.")

    def validate(self, names=None) -> None:
        """Raises SettingError naming the first bad setting (its flag), rule and value."""
        names = names or {}
        check(self, names)
        name = lambda field: names.get(field, field)  # noqa: E731
        if not isinstance(self.weights, str) or not self.weights or (
                self.weights not in WEIGHTS_KEYWORDS and not self.weights.endswith(".h5")):
            fail(name("weights"), "must be 'imagenet', 'none' or a path ending in '.h5'",
                 self.weights, "Use --weights=imagenet, --weights=none, or the path of a "
                 "keras.applications .h5 weights file (with or without top) or of a "
                 ".weights.h5 backbone saved by bench/pretrain_backbone.py.")
        if self.kernel_size % 2 == 0:
            fail(name("kernel_size"), "must be odd (same-padded 1-D conv)", self.kernel_size,
                 "The spec's default is 3.")
        if self.zero_init_residual and self.weights != "none":
            fail(name("zero_init_residual"), "applies to random initialisation only (weights "
                 f"{self.weights!r} would overwrite it)", self.zero_init_residual,
                 "Use --weights=none with --zero_init_residual, or leave it off.")

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        return to_json(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict; missing keys take defaults, unknown keys raise SettingError."""
        if not isinstance(d, dict):
            raise SettingError(
                f"ModelConfig.from_dict expects a dict; received {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SettingError(
                f"ModelConfig.from_dict: unknown field(s) {unknown}; known fields are "
                f"{sorted(known)}. Remove them or check the spelling.")
        kwargs = dict(d)
        if "dilations" in kwargs and isinstance(kwargs["dilations"], list):
            kwargs["dilations"] = tuple(kwargs["dilations"])
        return cls(**kwargs)
