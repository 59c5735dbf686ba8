"""GlamModule: the local and global branches of GLAM and their softmax-weighted fusion.

Spec sections "Fusion" and "Ablation variants": every variant of the paper's Table 5
(except "baseline", which has no module) is one value of `variant`.
"""

import math

import keras
import numpy as np
from keras import ops

from glam_tf.model.attention import (
    _check_choice,
    GlobalChannelAttention,
    GlobalSpatialAttention,
    LocalChannelAttention,
    LocalSpatialAttention,
)
from glam_tf.config.model import LOCAL_ACTIVATIONS, LOGIT_SCALES, VARIANTS
from glam_tf.config.settings import is_real

MODULE_VARIANTS = tuple(v for v in VARIANTS if v != "baseline")

# variant -> (local channel, local spatial, global channel, global spatial) present
_PARTS = {
    "local-channel": (True, False, False, False),
    "local-spatial": (False, True, False, False),
    "local": (True, True, False, False),
    "global-channel": (False, False, True, False),
    "global-spatial": (False, False, False, True),
    "global": (False, False, True, True),
    "global+local": (True, True, True, True),
}


@keras.saving.register_keras_serializable(package="glam_tf")
class GlamModule(keras.layers.Layer):
    """Global-local attention module on a backbone feature map F (Song et al., WACV 2022).

    Local branch (eqs. 1-2): F_c^l = F * A_c^l + F; F^l = F_c^l * A_s^l + F_c^l.
    Global branch (eqs. 5-6): F_c^g = F * G_c; F^g = F_c^g * G_s + F_c^g.
    All maps are computed from F. A variant without a channel part applies the spatial
    part to F (e.g. "local-spatial": F^l = F * A_s^l + F); without a spatial part the
    branch is its channel output (e.g. "global-channel": F^g = F_c^g).
    Fusion: F^gl = sum_b w_b F^b + w F over the branches present (local first, then
    global) and F, (w_b..., w) = softmax(beta). beta starts at zeros (equal weights,
    1 / (n_branches + 1)), or with `fusion_identity_weight` w0 in (0, 1) at
    beta_F = log(w0) - log((1 - w0) / n_branches), branch entries 0, so that w = w0 and
    the branches share 1 - w0 equally (`fusion_beta_init`).

    beta is reparametrised as beta = m * beta' with m = `fusion_lr_multiplier`: the
    weight holds beta' (initialised to beta_init / m). A step of Adam/AdamW moves beta'
    by ~lr whatever its gradient's scale, so beta moves ~m times faster than at m = 1,
    and decoupled weight decay shrinks beta at the same relative rate as beta'.

    Sublayers: `{name}_local_channel`, `{name}_local_spatial`, `{name}_global_channel`,
    `{name}_global_spatial` (those the variant uses); weight `{name}/fusion_beta`, which
    holds beta' (beta itself is `fusion_logits()`).

    Args:
        variant: one of MODULE_VARIANTS.
        reduced_channels: c' of the spatial branches (spec: 256).
        kernel_size: k of the 1-D channel convs (spec: 3).
        dilations: local spatial dilation rates (spec: (1, 2, 3)).
        zero_init_attention: start the output convs of both spatial blocks at zero
            (ModelConfig.zero_init_attention).
        fusion_identity_weight: initial fusion weight of F in [0, 1); 0 means equal
            weights (beta = 0, the spec) (ModelConfig.fusion_identity_weight).
        fusion_lr_multiplier: m > 0 of beta = m * beta' (ModelConfig.fusion_lr_multiplier).
        global_spatial_logit_scale: "none" or "sqrt", the global spatial block's
            `logit_scale` (ModelConfig.global_spatial_logit_scale).
        local_spatial_activation: "none" or "sigmoid", the local spatial block's
            `activation` (ModelConfig.local_spatial_activation).

    Call arguments:
        inputs: F, `(B, H, W, C)`.
        return_attention: also return a dict of the attention maps used
            ("local_channel" (B,1,1,C), "local_spatial" (B,H,W,1),
            "global_channel" (B,C,C), "global_spatial" (B,HW,HW)) and the branch outputs
            ("local", "global").

    Returns:
        F^gl `(B, H, W, C)`, or `(F^gl, dict)` with return_attention.
    """

    def __init__(self, variant="global+local", reduced_channels=256, kernel_size=3,
                 dilations=(1, 2, 3), zero_init_attention=False, fusion_identity_weight=0.0,
                 fusion_lr_multiplier=1.0, global_spatial_logit_scale="none",
                 local_spatial_activation="none", **kwargs):
        super().__init__(**kwargs)
        if variant not in MODULE_VARIANTS:
            hint = (" Variant 'baseline' has no GLAM module: build_descriptor_model "
                    "pools the backbone output directly." if variant == "baseline" else "")
            raise ValueError(f"GlamModule: `variant` must be one of {MODULE_VARIANTS}; "
                             f"received variant={variant!r}.{hint}")
        self.variant = variant
        self.reduced_channels = reduced_channels
        self.kernel_size = kernel_size
        self.dilations = tuple(dilations)
        if not is_real(fusion_identity_weight) or not 0.0 <= fusion_identity_weight < 1.0:
            raise ValueError("GlamModule: `fusion_identity_weight` must be a number in "
                             "[0, 1) (0: equal weights); received fusion_identity_weight="
                             f"{fusion_identity_weight!r}.")
        if (not is_real(fusion_lr_multiplier) or not math.isfinite(fusion_lr_multiplier)
                or fusion_lr_multiplier <= 0):
            raise ValueError("GlamModule: `fusion_lr_multiplier` must be a finite number "
                             "> 0 (1: beta learns like any weight); received "
                             f"fusion_lr_multiplier={fusion_lr_multiplier!r}.")
        # Checked here too: variants without a spatial block would ignore a bad value.
        _check_choice("GlamModule", "global_spatial_logit_scale", global_spatial_logit_scale,
                      LOGIT_SCALES)
        _check_choice("GlamModule", "local_spatial_activation", local_spatial_activation,
                      LOCAL_ACTIVATIONS)
        self.zero_init_attention = bool(zero_init_attention)
        self.local_spatial_activation = local_spatial_activation
        self.fusion_identity_weight = float(fusion_identity_weight)
        self.fusion_lr_multiplier = float(fusion_lr_multiplier)
        self.global_spatial_logit_scale = global_spatial_logit_scale
        lc, ls, gc, gs = _PARTS[variant]
        self.has_local = lc or ls
        self.has_global = gc or gs
        # Sublayers are created here (their args are validated now, so a bad value fails
        # at construction) and built in build().
        kw = dict(dtype=self.dtype_policy)
        name = self.name
        self.local_channel = (LocalChannelAttention(
            kernel_size, name=f"{name}_local_channel", **kw) if lc else None)
        self.local_spatial = (LocalSpatialAttention(
            reduced_channels, self.dilations, zero_init_output=self.zero_init_attention,
            activation=local_spatial_activation, name=f"{name}_local_spatial", **kw)
            if ls else None)
        self.global_channel = (GlobalChannelAttention(
            kernel_size, name=f"{name}_global_channel", **kw) if gc else None)
        self.global_spatial = (GlobalSpatialAttention(
            reduced_channels, zero_init_output=self.zero_init_attention,
            logit_scale=global_spatial_logit_scale, name=f"{name}_global_spatial", **kw)
            if gs else None)

    @property
    def num_branches(self):
        """Number of attention branches fused with F (1 or 2)."""
        return int(self.has_local) + int(self.has_global)

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(f"GlamModule '{self.name}' expects a (B, H, W, C) feature map "
                             f"with a known C; received shape {input_shape}.")
        for layer in (self.local_channel, self.local_spatial, self.global_channel,
                      self.global_spatial):
            if layer is not None:
                layer.build(input_shape)
        # Not autocast: under a mixed policy beta is read in float32 (bfloat16 would round
        # it to 3 significant digits) and the softmax of three scalars costs nothing.
        stored = self.fusion_beta_init() / self.fusion_lr_multiplier
        self.fusion_beta = self.add_weight(
            name="fusion_beta", shape=(self.num_branches + 1,),
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(stored, dtype),
            autocast=False)

    def fusion_beta_init(self):
        """Initial beta (not beta'), float32 NumPy `(n_branches + 1,)`: zeros, or with
        `fusion_identity_weight` w0 > 0, log(w0) - log((1 - w0) / n_branches) for F (last)
        and 0 for the branches, so that softmax(beta) = ((1 - w0) / n, ..., w0)."""
        beta = np.zeros((self.num_branches + 1,), np.float32)
        w0 = self.fusion_identity_weight
        if w0 > 0.0:
            beta[-1] = math.log(w0) - math.log((1.0 - w0) / self.num_branches)
        return beta

    def fusion_logits(self):
        """beta = fusion_lr_multiplier * beta' (the stored `fusion_beta`), float32
        `(n_branches + 1,)`."""
        return self.fusion_lr_multiplier * ops.cast(self.fusion_beta, "float32")

    def fusion_weights(self):
        """softmax(beta) in float32: `(n_branches + 1,)`, branches first (local, global), F
        last."""
        return ops.softmax(self.fusion_logits())

    def call(self, inputs, return_attention=False):
        f = inputs
        maps, branches = {}, []

        def apply(layer, key, *args, **kwargs):
            # The maps only when asked: the explicit (B, C, C) global channel map is what
            # the layer's own call avoids computing.
            if not return_attention:
                return layer(*args, **kwargs)
            out, maps[key] = layer(*args, return_attention=True, **kwargs)
            return out

        if self.has_local:
            x = f
            if self.local_channel is not None:
                x = apply(self.local_channel, "local_channel", f)
            if self.local_spatial is not None:
                x = apply(self.local_spatial, "local_spatial", f, target=x)
            maps["local"] = x
            branches.append(x)
        if self.has_global:
            x = f
            if self.global_channel is not None:
                x = apply(self.global_channel, "global_channel", f)
            if self.global_spatial is not None:
                x = apply(self.global_spatial, "global_spatial", f, target=x)
            maps["global"] = x
            branches.append(x)
        w = ops.cast(self.fusion_weights(), f.dtype)
        out = w[-1] * f
        for i, branch in enumerate(branches):
            out = out + w[i] * branch
        return (out, maps) if return_attention else out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, return_attention=False):
        if return_attention:
            # Keras' own inference by a symbolic trace of call() (what keras.Layer does
            # when compute_output_shape is not overridden), through the public base class.
            return keras.Operation.compute_output_spec(self, inputs, return_attention=True)
        return keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"variant": self.variant, "reduced_channels": self.reduced_channels,
                       "kernel_size": self.kernel_size, "dilations": list(self.dilations),
                       "zero_init_attention": self.zero_init_attention,
                       "fusion_identity_weight": self.fusion_identity_weight,
                       "fusion_lr_multiplier": self.fusion_lr_multiplier,
                       "global_spatial_logit_scale": self.global_spatial_logit_scale,
                       "local_spatial_activation": self.local_spatial_activation})
        return config
