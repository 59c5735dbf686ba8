"""Generalized-mean (GeM) pooling: pure `gem` function plus the `GeM` layer with learnable p."""

import keras
from keras import ops

# GeM spans average (p = 1) to max pooling (p -> inf) (Radenovic et al., 2018); below 1 it
# would favour the weakest activations. The learnable p is projected back to >= MIN_P after
# every optimizer update, so 1/p stays well conditioned.
MIN_P = 1.0


def gem(x, p, eps=1e-6):
    """Generalized-mean pooling over the spatial axes (Radenovic et al., 2018).

    f_c = (mean_{h,w} max(x_{h,w,c}, eps)^p)^(1/p); p = 1 is average pooling, p -> inf max.
    Computed in log space, f_c = exp((logsumexp_{h,w}(p log x) - log hw) / p), so neither
    eps^p (underflows to 0 in float32 above p ~ 6.4, making d f / d p NaN) nor x^p of large
    activations (overflows) is ever formed: value and gradients are finite for every p > 0.

    Args:
        x: feature map `(B, H, W, C)`.
        p: exponent, a scalar or a `(1,)` tensor, > 0.
        eps: lower clamp of x (keeps the log and its gradient finite at x <= 0).

    Returns:
        `(B, C)` pooled descriptor (not normalised).
    """
    log_x = ops.log(ops.maximum(x, eps))
    shape = ops.shape(x)
    log_count = ops.log(ops.cast(shape[1] * shape[2], log_x.dtype))
    log_mean = ops.logsumexp(p * log_x, axis=(1, 2)) - log_count
    return ops.exp(log_mean / p)


class _AtLeast(keras.constraints.Constraint):
    """Projects a weight to >= `minimum` after each optimizer update."""

    def __init__(self, minimum):
        self.minimum = float(minimum)

    def __call__(self, w):
        return ops.maximum(w, ops.cast(self.minimum, w.dtype))

    def get_config(self):
        return {"minimum": self.minimum}


@keras.saving.register_keras_serializable(package="glam_tf")
class GeM(keras.layers.Layer):
    """GeM pooling with a learnable exponent p (spec: "GeM pooling, p learnable, init 3").

    Args:
        p: initial exponent (>= MIN_P = 1); training keeps it >= MIN_P.
        eps: clamp of the features before the power.
        trainable_p: whether p is learned.

    Call arguments:
        inputs: `(B, H, W, C)` feature map.

    Returns:
        `(B, C)`.
    """

    def __init__(self, p=3.0, eps=1e-6, trainable_p=True, **kwargs):
        super().__init__(**kwargs)
        if not float(p) >= MIN_P:
            raise ValueError(f"GeM: `p` must be >= {MIN_P} (1 = average pooling); received "
                             f"p={p!r}.")
        if not float(eps) > 0:
            raise ValueError(f"GeM: `eps` must be > 0; received eps={eps!r}.")
        self.p_init = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"GeM expects a (B, H, W, C) input; received shape {input_shape}.")
        self.p = self.add_weight(
            name="p", shape=(1,),
            initializer=keras.initializers.Constant(self.p_init),
            constraint=_AtLeast(MIN_P),
            trainable=self.trainable_p,
            autocast=False)   # p in float32 under a mixed policy (not rounded to bfloat16)

    def call(self, inputs):
        # float32 whatever the policy: the log-space sums need float32's range and precision.
        pooled = gem(ops.cast(inputs, "float32"), ops.cast(self.p, "float32"), self.eps)
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.p_init, "eps": self.eps, "trainable_p": self.trainable_p})
        return config


def _reflect_indices(n, half):
    """Indices of a reflection padding by `half` of an axis of length n (any n >= 1).

    As numpy's pad mode "reflect" (edge not repeated), reflecting again where `half` >= n
    (so maps smaller than the window work: a 1-wide axis repeats its one entry).
    """
    i = ops.arange(-half, n + half)
    period = ops.maximum(2 * (n - 1), 1)
    r = ops.mod(i, period)
    return ops.where(n > 1, ops.where(r >= n, period - r, r), ops.zeros_like(i))


def regional_gem(x, p=2.5, size=5, eps=1e-6):
    """Regional GeM (SuperGlobal, Shao et al., ICCV 2023, eq. 3): each position of the
    feature map becomes the mean of itself and the L^p pool of its size x size
    neighbourhood.

    y = x / 2 + (mean_{window} max(x, eps)^p)^(1/p) / 2, windows centred on each position
    over the reflection-padded map (the authors' `0.5 * LPPool2d(pad(x / (size^2)^(1/p))) +
    0.5 * x`): normalised by the window size, so a constant map (> eps) is unchanged. Maps
    smaller than the window are reflected again (numpy's "reflect"), where the authors'
    ReflectionPad2d would fail.

    Args:
        x: feature map `(B, H, W, C)`.
        p: exponent of the pool (> 0).
        size: odd window side.
        eps: lower clamp before the power (the features may be negative).

    Returns:
        `(B, H, W, C)`.
    """
    half = size // 2
    shape = ops.shape(x)
    powered = ops.power(ops.maximum(x, eps), p)
    padded = ops.take(powered, _reflect_indices(shape[1], half), axis=1)
    padded = ops.take(padded, _reflect_indices(shape[2], half), axis=2)
    mean_p = ops.average_pool(padded, pool_size=size, strides=1, padding="valid")
    return 0.5 * x + 0.5 * ops.power(mean_p, 1.0 / p)


@keras.saving.register_keras_serializable(package="glam_tf")
class RegionalGeM(keras.layers.Layer):
    """Regional GeM on a feature map, a training-free inference option before GeM.

    Args:
        p: exponent of the regional L^p pool (the authors' 2.5).
        size: odd window side (the authors' 5).
        eps: clamp of the features before the power.

    Call arguments:
        inputs: `(B, H, W, C)` feature map.

    Returns:
        `(B, H, W, C)`, computed in float32.
    """

    def __init__(self, p=2.5, size=5, eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        if not float(p) > 0:
            raise ValueError(f"RegionalGeM: `p` must be > 0; received p={p!r}.")
        if not (isinstance(size, int) and size >= 1 and size % 2 == 1):
            raise ValueError(f"RegionalGeM: `size` must be an odd positive integer (a "
                             f"centred window); received size={size!r}.")
        if not float(eps) > 0:
            raise ValueError(f"RegionalGeM: `eps` must be > 0; received eps={eps!r}.")
        self.p = float(p)
        self.size = size
        self.eps = float(eps)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"RegionalGeM expects a (B, H, W, C) input; received shape {input_shape}.")

    def call(self, inputs):
        out = regional_gem(ops.cast(inputs, "float32"), self.p, self.size, self.eps)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.p, "size": self.size, "eps": self.eps})
        return config
