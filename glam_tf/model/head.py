"""Embedding head: dropout -> Dense (C -> D) -> BatchNorm -> L2 normalisation."""

import keras
from keras import ops


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, sqrt(eps)) along `axis` (rows of unit norm; zero rows stay zero)."""
    sq = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(sq, eps))


@keras.saving.register_keras_serializable(package="glam_tf")
class EmbeddingHead(keras.layers.Layer):
    """Pooled features to the unit descriptor (spec: "Placement and head").

    Dropout (rate `dropout`) -> Dense(embedding_dim, no bias: the BatchNorm right after
    removes any bias, so it would be a dead weight) -> BatchNormalization -> L2.
    The output is float32 whatever the dtype policy, as the contract's descriptor.

    Args:
        embedding_dim: descriptor size D (spec: 512).
        dropout: dropout rate in [0, 1) (spec, inferred: 0).

    Call arguments:
        inputs: `(B, C)` pooled features.
        training: Python bool or None (dropout and BatchNorm batch statistics).

    Returns:
        `(B, D)` float32, each row of unit L2 norm.
    """

    def __init__(self, embedding_dim=512, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(
                f"EmbeddingHead: `embedding_dim` must be a positive int; "
                f"received embedding_dim={embedding_dim!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(
                f"EmbeddingHead: `dropout` must be in [0, 1); received dropout={dropout!r}.")
        self.embedding_dim = embedding_dim
        self.dropout = float(dropout)

    def build(self, input_shape):
        self.dropout_layer = keras.layers.Dropout(
            self.dropout, name=f"{self.name}_dropout", dtype=self.dtype_policy)
        self.dense = keras.layers.Dense(
            self.embedding_dim, use_bias=False, name=f"{self.name}_dense",
            dtype=self.dtype_policy)
        self.dense.build(input_shape)
        self.bn = keras.layers.BatchNormalization(
            name=f"{self.name}_bn", dtype=self.dtype_policy)
        self.bn.build((input_shape[0], self.embedding_dim))

    def call(self, inputs, training=None):
        x = self.dropout_layer(inputs, training=training)
        x = self.dense(x)
        x = self.bn(x, training=training)
        return l2_normalize(ops.cast(x, "float32"), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"embedding_dim": self.embedding_dim, "dropout": self.dropout})
        return config
