"""The four attention blocks of GLAM (Song et al., WACV 2022), spec sections 1-4.

Every layer computes its attention map from its own input F. The two spatial blocks
take an optional `target` to apply the map to (GLAM applies channel attention first,
then spatial attention computed from the same F to the channel-attended map); the
default target is F itself. Every call accepts `return_attention=True`, which returns
`(output, attention_map)` so the maps can be checked directly.
"""

import math
import warnings

import keras
from keras import ops

from glam_tf.config.model import LOCAL_ACTIVATIONS, LOGIT_SCALES


def _check_feature_shape(layer, input_shape):
    if len(input_shape) != 4 or input_shape[-1] is None:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' expects a (B, H, W, C) feature map with "
            f"a known C; received shape {input_shape}.")
    return int(input_shape[-1])


def _check_positive_int(layer_cls, name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{layer_cls}: `{name}` must be a positive int; received "
                         f"{name}={value!r}.")


def _check_choice(layer_cls, name, value, choices):
    if value not in choices:
        raise ValueError(f"{layer_cls}: `{name}` must be one of {choices}; received "
                         f"{name}={value!r}.")


def _check_kernel_size(layer_cls, value):
    _check_positive_int(layer_cls, "kernel_size", value)
    if value % 2 == 0:
        raise ValueError(f"{layer_cls}: `kernel_size` must be odd (same-padded 1-D conv "
                         f"along channels); received kernel_size={value!r}.")


def _channel_conv1d(s, conv):
    """1-D conv along the channel axis: `(B, C)` -> `(B, C)` (s reshaped to (B, C, 1))."""
    return ops.squeeze(conv(ops.expand_dims(s, -1)), -1)


def _powers(x, n):
    """`(B, C)` -> `(B, n, C)`, [b, i, c] = x[b, c]^i, by repeated products (finite
    gradients at x = 0, unlike pow with exponent 0)."""
    out = [ops.ones_like(x)]
    for _ in range(n - 1):
        out.append(out[-1] * x)
    return ops.stack(out, axis=1)


def _output_init(zero):
    """Conv2D kwargs of a spatial block's output conv: zeros, or the Keras default."""
    return {"kernel_initializer": "zeros"} if zero else {}


def _spec(shape, dtype):
    return keras.KerasTensor(tuple(shape), dtype=dtype)


@keras.saving.register_keras_serializable(package="glam_tf")
class LocalChannelAttention(keras.layers.Layer):
    """Local channel attention (ECA-style), spec "Local channel attention", eq. 1.

    A = sigmoid(conv1d_k(GAP(F))) of shape `(B, 1, 1, C)`; output F_c^l = F * A + F.

    Args:
        kernel_size: k of the 1-D conv along channels (odd; spec: 3).

    Call arguments:
        inputs: F, `(B, H, W, C)`.
        return_attention: also return A.

    Returns:
        `(B, H, W, C)`, or `(output, A (B, 1, 1, C))` with return_attention.
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        _check_kernel_size("LocalChannelAttention", kernel_size)
        self.kernel_size = kernel_size

    def build(self, input_shape):
        channels = _check_feature_shape(self, input_shape)
        self.conv = keras.layers.Conv1D(
            1, self.kernel_size, padding="same", name=f"{self.name}_conv",
            dtype=self.dtype_policy)
        self.conv.build((None, channels, 1))

    def attention(self, inputs):
        """A_c^l: `(B, H, W, C)` -> `(B, 1, 1, C)`."""
        s = ops.mean(inputs, axis=(1, 2))
        a = ops.sigmoid(_channel_conv1d(s, self.conv))
        return a[:, None, None, :]

    def call(self, inputs, return_attention=False):
        a = self.attention(inputs)
        out = inputs * a + inputs
        return (out, a) if return_attention else out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, return_attention=False):
        out = _spec(inputs.shape, self.compute_dtype)
        if return_attention:
            return out, _spec((inputs.shape[0], 1, 1, inputs.shape[-1]), self.compute_dtype)
        return out

    def get_config(self):
        config = super().get_config()
        config.update({"kernel_size": self.kernel_size})
        return config


@keras.saving.register_keras_serializable(package="glam_tf")
class LocalSpatialAttention(keras.layers.Layer):
    """Local spatial attention, spec "Local spatial attention", eq. 2.

    F' = conv1x1(F) (C -> c'); branches: 3x3 convs of F' with each dilation (c' -> c')
    and a 1x1 conv of F' (c' -> c'); concatenated (order: dilations ascending as given,
    then the 1x1 branch) -> conv1x1 to 1 channel = A, `(B, H, W, 1)`, no activation
    (the spec; `activation="sigmoid"` bounds A to (0, 1)). Output: target * A + target.

    Sublayers: `{name}_conv_reduce`, `{name}_conv_d{d}` per dilation, `{name}_conv_1x1`,
    `{name}_conv_out`.

    Args:
        reduced_channels: c' (spec: 256).
        dilations: dilation rates of the 3x3 convs (spec: (1, 2, 3)).
        zero_init_output: start `conv_out` at zero, so A = 0 and the block starts as its
            residual identity (the paper does not say how it initialises; see
            ModelConfig.zero_init_attention).
        activation: "none" (the spec) or "sigmoid" (ModelConfig.local_spatial_activation).

    Call arguments:
        inputs: F, `(B, H, W, C)`, from which A is computed.
        target: `(B, H, W, C)` map that A is applied to (default: F).
        return_attention: also return A.

    Returns:
        `(B, H, W, C)`, or `(output, A (B, H, W, 1))` with return_attention.
    """

    def __init__(self, reduced_channels=256, dilations=(1, 2, 3), zero_init_output=False,
                 activation="none", **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("LocalSpatialAttention", "reduced_channels", reduced_channels)
        _check_choice("LocalSpatialAttention", "activation", activation, LOCAL_ACTIVATIONS)
        dilations = tuple(dilations)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(
                "LocalSpatialAttention: `dilations` must be a non-empty tuple of positive "
                f"ints; received dilations={dilations!r}.")
        if len(set(dilations)) != len(dilations):
            raise ValueError(
                "LocalSpatialAttention: `dilations` must not repeat (sublayer names are "
                f"'..._conv_d<rate>'); received dilations={dilations!r}.")
        self.reduced_channels = reduced_channels
        self.dilations = dilations
        self.zero_init_output = bool(zero_init_output)
        self.activation = activation

    def build(self, inputs_shape, target_shape=None):
        channels = _check_feature_shape(self, inputs_shape)
        cp = self.reduced_channels
        kw = dict(dtype=self.dtype_policy)
        self.conv_reduce = keras.layers.Conv2D(cp, 1, name=f"{self.name}_conv_reduce", **kw)
        self.conv_reduce.build((None, None, None, channels))
        for d in self.dilations:
            conv = keras.layers.Conv2D(cp, 3, padding="same", dilation_rate=d,
                                       name=f"{self.name}_conv_d{d}", **kw)
            conv.build((None, None, None, cp))
            # One attribute per conv: tf.train.Checkpoint (TF 2.21, Keras 3.15) does not
            # save sublayers held in a list attribute of a Keras layer.
            setattr(self, f"conv_d{d}", conv)
        self.conv_1x1 = keras.layers.Conv2D(cp, 1, name=f"{self.name}_conv_1x1", **kw)
        self.conv_1x1.build((None, None, None, cp))
        self.conv_out = keras.layers.Conv2D(1, 1, name=f"{self.name}_conv_out",
                                            **_output_init(self.zero_init_output), **kw)
        self.conv_out.build((None, None, None, cp * (len(self.dilations) + 1)))

    @property
    def dilated_convs(self):
        """The 3x3 convs, in the order of `dilations`."""
        return [getattr(self, f"conv_d{d}") for d in self.dilations]

    def attention(self, inputs):
        """A_s^l: `(B, H, W, C)` -> `(B, H, W, 1)`."""
        fp = self.conv_reduce(inputs)
        branches = [conv(fp) for conv in self.dilated_convs] + [self.conv_1x1(fp)]
        a = self.conv_out(ops.concatenate(branches, axis=-1))
        return ops.sigmoid(a) if self.activation == "sigmoid" else a

    def call(self, inputs, target=None, return_attention=False):
        a = self.attention(inputs)
        target = inputs if target is None else target
        out = target * a + target
        return (out, a) if return_attention else out

    def compute_output_shape(self, inputs_shape, target_shape=None):
        return tuple(inputs_shape)

    def compute_output_spec(self, inputs, target=None, return_attention=False):
        out = _spec(inputs.shape, self.compute_dtype)
        if return_attention:
            return out, _spec(tuple(inputs.shape[:3]) + (1,), self.compute_dtype)
        return out

    def get_config(self):
        config = super().get_config()
        config.update({"reduced_channels": self.reduced_channels,
                       "dilations": list(self.dilations),
                       "zero_init_output": self.zero_init_output,
                       "activation": self.activation})
        return config


@keras.saving.register_keras_serializable(package="glam_tf")
class GlobalChannelAttention(keras.layers.Layer):
    """Global channel attention, spec "Global channel attention", eq. 5.

    s = GAP(F); q = sigmoid(conv1d_q(s)), kappa = sigmoid(conv1d_k(s)) (two separate
    convs); a[i, j] = exp(kappa_i q_j) / sum_i' exp(kappa_i' q_j) (softmax over the key
    index i: each column sums to 1); G_c[p, j] = sum_i F[p, i] a[i, j];
    output F_c^g = F * G_c (no residual).

    `call` never forms the C x C map: the logits kappa_i q_j are a rank-1 matrix with
    entries in (0, 1) (both factors are sigmoids), so exp(kappa_i q_j) =
    sum_n kappa_i^n q_j^n / n! and, truncated after `SERIES_TERMS` terms (remainder
    < e / 16! < 1.3e-13, far below float32 resolution), numerator and denominator of the
    softmax become two (hw x C) @ (C x N) and (N x C) products: O(hw C N) instead of
    O(hw C^2), without a (B, 2048, 2048) tensor. `attention()` and `return_attention`
    give the explicit map.

    Sublayers: `{name}_conv_query`, `{name}_conv_key`.

    Args:
        kernel_size: k of the two 1-D convs along channels (odd; spec: 3).

    Call arguments:
        inputs: F, `(B, H, W, C)`.
        return_attention: also return a.

    Returns:
        `(B, H, W, C)`, or `(output, a (B, C, C))` with return_attention, a[b, i, j].
    """

    SERIES_TERMS = 16

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        _check_kernel_size("GlobalChannelAttention", kernel_size)
        self.kernel_size = kernel_size

    def build(self, input_shape):
        channels = _check_feature_shape(self, input_shape)
        kw = dict(padding="same", dtype=self.dtype_policy)
        self.conv_query = keras.layers.Conv1D(1, self.kernel_size,
                                              name=f"{self.name}_conv_query", **kw)
        self.conv_key = keras.layers.Conv1D(1, self.kernel_size,
                                            name=f"{self.name}_conv_key", **kw)
        self.conv_query.build((None, channels, 1))
        self.conv_key.build((None, channels, 1))

    def _query_key(self, inputs):
        """(q, kappa): `(B, H, W, C)` -> two float32 `(B, C)` in (0, 1)."""
        s = ops.mean(inputs, axis=(1, 2))
        q = ops.cast(ops.sigmoid(_channel_conv1d(s, self.conv_query)), "float32")
        k = ops.cast(ops.sigmoid(_channel_conv1d(s, self.conv_key)), "float32")
        return q, k

    def attention(self, inputs):
        """a: `(B, H, W, C)` -> `(B, C, C)`, a[b, i, j], softmax over i (axis 1)."""
        return self._explicit_map(*self._query_key(inputs))

    def _explicit_map(self, q, k):
        # [b, j, i] = kappa_i q_j: the softmax over i runs on the contiguous last axis.
        a_t = ops.softmax(q[:, :, None] * k[:, None, :], axis=-1)
        return ops.cast(ops.transpose(a_t, (0, 2, 1)), self.compute_dtype)

    def call(self, inputs, return_attention=False):
        q, k = self._query_key(inputs)
        inv_factorial = ops.convert_to_tensor(
            [1.0 / math.factorial(i) for i in range(self.SERIES_TERMS)], "float32")
        k_pow = _powers(k, self.SERIES_TERMS)                                # (B, N, C)
        q_pow = _powers(q, self.SERIES_TERMS) * inv_factorial[None, :, None]
        v = ops.cast(inputs, "float32")
        moments = ops.einsum("bhwi,bni->bhwn", v, k_pow)       # sum_i F[p, i] kappa_i^n
        num = ops.einsum("bhwn,bnj->bhwj", moments, q_pow)      # sum_i F[p, i] exp(k_i q_j)
        den = ops.einsum("bn,bnj->bj", ops.sum(k_pow, axis=-1), q_pow)  # sum_i exp(k_i q_j)
        g = ops.cast(num / den[:, None, None, :], self.compute_dtype)
        out = inputs * g
        return (out, self._explicit_map(q, k)) if return_attention else out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, return_attention=False):
        out = _spec(inputs.shape, self.compute_dtype)
        if return_attention:
            c = inputs.shape[-1]
            return out, _spec((inputs.shape[0], c, c), self.compute_dtype)
        return out

    def get_config(self):
        config = super().get_config()
        config.update({"kernel_size": self.kernel_size})
        return config


@keras.saving.register_keras_serializable(package="glam_tf")
class GlobalSpatialAttention(keras.layers.Layer):
    """Global spatial (non-local) attention, spec "Global spatial attention", eq. 6.

    Q, K, V = conv1x1(F) (C -> c'), flattened to (HW, c'); a[m, n] =
    exp(s K_m . Q_n) / sum_m' exp(s K_m' . Q_n) (softmax over key positions m for each
    query n; s = 1 as in the spec, or 1/sqrt(c') with logit_scale "sqrt");
    O_n = sum_m a[m, n] V_m; G_s = conv1x1(O) (c' -> C); output = target * G_s + target.

    The key conv has no bias: a bias b adds b . Q_n to every logit of column n, which the
    softmax over m cancels, so it could never receive a gradient.

    Sublayers: `{name}_conv_query`, `{name}_conv_key`, `{name}_conv_value`,
    `{name}_conv_out`.

    Args:
        reduced_channels: c' (spec: 256).
        zero_init_output: start `conv_out` at zero, so G_s = 0 and the block starts as its
            residual identity, as non-local blocks do (Wang et al., CVPR 2018).
        logit_scale: "none" (the spec: a = softmax(K.Q)) or "sqrt" (a = softmax(K.Q /
            sqrt(c')), as transformers scale dot products, so the softmax over HW
            positions saturates less; ModelConfig.global_spatial_logit_scale).

    Call arguments:
        inputs: F, `(B, H, W, C)`, from which G_s is computed.
        target: `(B, H, W, C)` map that G_s is applied to (default: F).
        return_attention: also return a.

    Returns:
        `(B, H, W, C)`, or `(output, a (B, HW, HW))` with return_attention, a[b, m, n],
        positions flattened row-major (m = y * W + x).
    """

    def __init__(self, reduced_channels=256, zero_init_output=False, logit_scale="none",
                 **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("GlobalSpatialAttention", "reduced_channels", reduced_channels)
        _check_choice("GlobalSpatialAttention", "logit_scale", logit_scale, LOGIT_SCALES)
        self.reduced_channels = reduced_channels
        self.zero_init_output = bool(zero_init_output)
        self.logit_scale = logit_scale

    def build(self, inputs_shape, target_shape=None):
        channels = _check_feature_shape(self, inputs_shape)
        cp = self.reduced_channels
        kw = dict(dtype=self.dtype_policy)
        self.conv_query = keras.layers.Conv2D(cp, 1, name=f"{self.name}_conv_query", **kw)
        self.conv_key = keras.layers.Conv2D(cp, 1, use_bias=False,
                                            name=f"{self.name}_conv_key", **kw)
        self.conv_value = keras.layers.Conv2D(cp, 1, name=f"{self.name}_conv_value", **kw)
        self.conv_out = keras.layers.Conv2D(channels, 1, name=f"{self.name}_conv_out",
                                            **_output_init(self.zero_init_output), **kw)
        for conv in (self.conv_query, self.conv_key, self.conv_value):
            conv.build((None, None, None, channels))
        self.conv_out.build((None, None, None, cp))

    def _flat(self, x):
        return ops.reshape(x, (ops.shape(x)[0], -1, self.reduced_channels))

    def _attention_and_value(self, inputs):
        q = self._flat(self.conv_query(inputs))
        k = self._flat(self.conv_key(inputs))
        v = self._flat(self.conv_value(inputs))
        # Logits and softmax in float32: unscaled dot products over c' channels are large,
        # and bfloat16 would round them to a fraction of a unit.
        logits = ops.einsum("bmc,bnc->bmn", ops.cast(k, "float32"),
                            ops.cast(q, "float32"))  # [b, m, n] = K_m . Q_n
        if self.logit_scale == "sqrt":
            logits = logits * (1.0 / math.sqrt(self.reduced_channels))
        with warnings.catch_warnings():
            # A 1x1 feature map (input <= 32 px) has one key: softmax = 1 is right there.
            warnings.filterwarnings("ignore", message="You are using a softmax over axis")
            a = ops.softmax(logits, axis=1)
        return ops.cast(a, self.compute_dtype), v

    def attention(self, inputs):
        """a: `(B, H, W, C)` -> `(B, HW, HW)`, a[b, m, n], softmax over m (axis 1)."""
        return self._attention_and_value(inputs)[0]

    def call(self, inputs, target=None, return_attention=False):
        a, v = self._attention_and_value(inputs)
        o = ops.einsum("bmn,bmc->bnc", a, v)
        shape = ops.shape(inputs)
        o = ops.reshape(o, (shape[0], shape[1], shape[2], self.reduced_channels))
        g = self.conv_out(o)
        target = inputs if target is None else target
        out = target * g + target
        return (out, a) if return_attention else out

    def compute_output_shape(self, inputs_shape, target_shape=None):
        return tuple(inputs_shape)

    def compute_output_spec(self, inputs, target=None, return_attention=False):
        out = _spec(inputs.shape, self.compute_dtype)
        if return_attention:
            h, w = inputs.shape[1], inputs.shape[2]
            hw = h * w if h is not None and w is not None else None
            return out, _spec((inputs.shape[0], hw, hw), self.compute_dtype)
        return out

    def get_config(self):
        config = super().get_config()
        config.update({"reduced_channels": self.reduced_channels,
                       "zero_init_output": self.zero_init_output,
                       "logit_scale": self.logit_scale})
        return config
