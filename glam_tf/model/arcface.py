"""ArcFace (additive angular margin) logits: pure `arcface_logits` plus the `ArcFace` layer."""

import math

import keras
from keras import ops

from glam_tf.model.head import l2_normalize

# Clamp of 1 - cos^2 under the square root: keeps sin(theta) and its gradient finite at
# cos(theta) = +-1 (d sqrt(u)/du = 1/(2 sqrt(u)) is infinite at u = 0). The clip passes no
# gradient below the clamp; the error it adds to a logit is at most scale*sin(m)*1e-6.
_SIN_SQ_EPS = 1e-12


def arcface_logits(cosine, labels, margin=0.3, scale=30.0):
    """ArcFace logits from cosines (Deng et al., CVPR 2019, arXiv 1801.07698, eq. 3).

    True class: s*cos(theta + m); other classes: s*cos(theta). Safe form:
    cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), sin(theta) = sqrt(1 - cos^2)
    (clamped away from 0), and where theta + m > pi, i.e. cos(theta) < cos(pi - m), the
    monotone fallback cos(theta) - m*sin(m). Finite logits and gradients for all
    cos(theta) in [-1, 1]. Computed in float32.

    Args:
        cosine: `(B, N)` cosines between embeddings and class centres (clipped to [-1, 1]).
        labels: `(B,)` integer class ids in [0, N).
        margin: m in radians, in [0, pi/2] (spec: 0.3).
        scale: s > 0 (spec, inferred: 30).

    Returns:
        `(B, N)` float32 logits.
    """
    cosine = ops.clip(ops.cast(cosine, "float32"), -1.0, 1.0)
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    threshold = math.cos(math.pi - margin)
    sine = ops.sqrt(ops.clip(1.0 - ops.square(cosine), _SIN_SQ_EPS, 1.0))
    cos_theta_m = cosine * cos_m - sine * sin_m
    target = ops.where(cosine > threshold, cos_theta_m, cosine - margin * sin_m)
    one_hot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"),
                          ops.shape(cosine)[-1], dtype="float32")
    logits = one_hot * target + (1.0 - one_hot) * cosine
    return scale * logits


@keras.saving.register_keras_serializable(package="glam_tf")
class ArcFace(keras.layers.Layer):
    """Training head: class centres W (num_classes, D), logits from cos(embedding, W_c).

    Both the embeddings and the centre rows are L2-normalised inside the call, so the
    cosine is exact whatever the norms; the margin is applied by `arcface_logits`.

    Args:
        num_classes: number of training classes N.
        margin: additive angular margin m (spec: 0.3).
        scale: logit scale s (spec, inferred: 30).

    Call arguments:
        embeddings: `(B, D)` descriptors.
        labels: `(B,)` integer class ids.

    Returns:
        `(B, N)` float32 logits (feed to sparse categorical cross-entropy from logits).
    """

    def __init__(self, num_classes, margin=0.3, scale=30.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"ArcFace: `num_classes` must be a positive int; "
                f"received num_classes={num_classes!r}.")
        if not 0.0 <= float(margin) <= math.pi / 2:
            raise ValueError(
                f"ArcFace: `margin` must be in [0, pi/2] radians; received margin={margin!r}.")
        if not float(scale) > 0:
            raise ValueError(f"ArcFace: `scale` must be > 0; received scale={scale!r}.")
        self.num_classes = num_classes
        self.margin = float(margin)
        self.scale = float(scale)

    def build(self, embeddings_shape, labels_shape=None):
        self.centers = self.add_weight(
            name="centers", shape=(self.num_classes, embeddings_shape[-1]),
            initializer="glorot_uniform")

    def cosine(self, embeddings):
        """`(B, D)` embeddings -> `(B, N)` float32 cosines to the normalised class centres."""
        e = l2_normalize(ops.cast(embeddings, "float32"))
        w = l2_normalize(ops.cast(self.centers, "float32"))
        return ops.matmul(e, ops.transpose(w))

    def call(self, embeddings, labels):
        return arcface_logits(self.cosine(embeddings), labels, self.margin, self.scale)

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], self.num_classes)

    def compute_output_spec(self, embeddings, labels):
        return keras.KerasTensor((embeddings.shape[0], self.num_classes), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "margin": self.margin,
                       "scale": self.scale})
        return config
