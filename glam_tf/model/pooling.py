"""Generalized-mean (GeM) pooling: pure `gem` function plus the `GeM` layer with learnable p."""

import keras
from keras import ops


def gem(x, p, eps=1e-6):
    """Generalized-mean pooling over the spatial axes (Radenovic et al., 2018).

    f_c = (mean_{h,w} max(x_{h,w,c}, eps)^p)^(1/p); p = 1 is average pooling, p -> inf max.

    Args:
        x: feature map `(B, H, W, C)`.
        p: exponent, a scalar or a `(1,)` tensor, > 0.
        eps: lower clamp of x (keeps the power and its gradient finite at x <= 0).

    Returns:
        `(B, C)` pooled descriptor (not normalised).
    """
    x = ops.maximum(x, eps)
    pooled = ops.mean(ops.power(x, p), axis=(1, 2))
    return ops.power(pooled, 1.0 / p)


@keras.saving.register_keras_serializable(package="glam_tf")
class GeM(keras.layers.Layer):
    """GeM pooling with a learnable exponent p (spec: "GeM pooling, p learnable, init 3").

    Args:
        p: initial exponent (> 0).
        eps: clamp of the features before the power.
        trainable_p: whether p is learned.

    Call arguments:
        inputs: `(B, H, W, C)` feature map.

    Returns:
        `(B, C)`.
    """

    def __init__(self, p=3.0, eps=1e-6, trainable_p=True, **kwargs):
        super().__init__(**kwargs)
        if not float(p) > 0:
            raise ValueError(f"GeM: `p` must be > 0; received p={p!r}.")
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
            trainable=self.trainable_p)

    def call(self, inputs):
        # float32 whatever the policy: x^p of large activations overflows/rounds in 16 bits.
        pooled = gem(ops.cast(inputs, "float32"), ops.cast(self.p, "float32"), self.eps)
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.p_init, "eps": self.eps, "trainable_p": self.trainable_p})
        return config
