"""A small stand-in descriptor model for training tests where the backbone does not matter.

Same contract as glam_tf.model.build_descriptor_model (input "image" float32 (B, H, W, 3)
in [0, 255], output (B, D) unit rows, sublayers "backbone", "glam", "gem", "head"), with
a two-conv backbone instead of a ResNet, so a training step traces in about a second
instead of ~20 s. The backbone has BatchNormalization layers, so synchronized batch
norm is exercised. GLAM, GeM and the head are the real glam_tf.model layers.
"""

from __future__ import annotations

import keras

from glam_tf.model import EmbeddingHead, GeM, GlamModule, ModelConfig

TINY_CHANNELS = 16


def tiny_descriptor_model(config: ModelConfig) -> keras.Model:
    """Conv(8, s2)-BN-ReLU-Conv(16, s2)-BN-ReLU -> GLAM(config.variant) -> GeM -> head.

    Args:
        config: only variant, reduced_channels, kernel_size, dilations, gem_p, gem_eps,
            embedding_dim and dropout are used (backbone and weights are ignored).

    Returns:
        keras.Model `(B, H, W, 3)` -> `(B, embedding_dim)` unit rows.
    """
    image = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(image)
    backbone = keras.Sequential([
        keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.ReLU(name="relu1"),
        keras.layers.Conv2D(TINY_CHANNELS, 3, strides=2, padding="same", use_bias=False,
                            name="conv2"),
        keras.layers.BatchNormalization(name="bn2"),
        keras.layers.ReLU(name="relu2"),
    ], name="backbone")
    x = backbone(x)
    if config.variant != "baseline":
        x = GlamModule(config.variant, reduced_channels=min(config.reduced_channels, 8),
                       kernel_size=config.kernel_size, dilations=tuple(config.dilations),
                       zero_init_attention=config.zero_init_attention, name="glam")(x)
    x = GeM(p=config.gem_p, eps=config.gem_eps, name="gem")(x)
    x = EmbeddingHead(config.embedding_dim, dropout=config.dropout, name="head")(x)
    return keras.Model(image, x, name="tiny_" + config.variant.replace("+", "_"))


# `python -c DRIVER --flag=...`: train_main with the stand-in model, for subprocess tests
# (real flag parsing, strategy, signals and exit codes; a model that traces fast).
DRIVER = (
    "from absl import app\n"
    "import train_main\n"
    "from glam_tf.train.testing import tiny_descriptor_model\n"
    "app.run(lambda argv: train_main.main(argv, model_fn=tiny_descriptor_model))\n"
)
