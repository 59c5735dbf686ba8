"""ModelConfig validation and serialisation; backbone construction and its weight errors."""

import json

import numpy as np
import pytest
import keras
import tensorflow as tf

from glam_tf.config import SettingError
from glam_tf.model import (
    BACKBONES,
    VARIANTS,
    BackboneWeightsError,
    ModelConfig,
    build_backbone,
    build_descriptor_model,
    imagenet_weights_file,
)
from glam_tf.model import backbone as backbone_lib
from glam_tf.model import builder


def test_default_config_is_the_spec():
    cfg = ModelConfig()
    cfg.validate()
    assert (cfg.backbone, cfg.weights, cfg.variant) == ("resnet101", "imagenet", "global+local")
    assert (cfg.reduced_channels, cfg.kernel_size, cfg.dilations) == (256, 3, (1, 2, 3))
    assert (cfg.gem_p, cfg.gem_eps, cfg.embedding_dim, cfg.dropout) == (3.0, 1e-6, 512, 0.0)
    # Not in the paper; the defaults are the spec's module (beta = 0 learned at the
    # network's rate, unscaled global spatial logits).
    assert (cfg.fusion_identity_weight, cfg.fusion_lr_multiplier,
            cfg.global_spatial_logit_scale, cfg.local_spatial_activation) == (
                0.0, 1.0, "none", "none")
    assert VARIANTS == ("baseline", "local-channel", "local-spatial", "local",
                        "global-channel", "global-spatial", "global", "global+local")
    assert BACKBONES == ("resnet50", "resnet101", "resnet152")


def test_config_json_round_trip():
    cfg = ModelConfig(backbone="resnet50", weights="none", variant="local",
                      reduced_channels=64, dilations=(1, 3, 5), dropout=0.2,
                      fusion_identity_weight=0.8, fusion_lr_multiplier=10.0,
                      global_spatial_logit_scale="sqrt", local_spatial_activation="sigmoid")
    text = json.dumps(cfg.to_dict())
    back = ModelConfig.from_dict(json.loads(text))
    assert back == cfg and isinstance(back.dilations, tuple)
    assert ModelConfig.from_dict({"variant": "global"}) == ModelConfig(variant="global")
    with pytest.raises(SettingError, match="unknown field.*'reduced_chanels'"):
        ModelConfig.from_dict({"reduced_chanels": 3})


@pytest.mark.parametrize("field,value,rule", [
    ("variant", "glam", "must be one of"),
    ("backbone", "resnet18", "must be one of"),
    ("weights", "weights.pt", "path ending in '.h5'"),
    ("weights", None, "must be 'imagenet'"),
    ("reduced_channels", 0, "positive integer"),
    ("reduced_channels", 256.0, "positive integer"),
    ("kernel_size", 4, "odd"),
    ("dilations", (), "non-empty"),
    ("dilations", (1, 0, 3), "positive integers"),
    ("gem_p", 0.5, ">= 1"),
    ("gem_eps", -1e-6, "> 0"),
    ("embedding_dim", True, "positive integer"),
    ("dropout", 1.0, r"\[0, 1\)"),
    ("zero_init_attention", 1, "must be a bool"),
    ("fusion_identity_weight", 1.0, r"must be a number in \[0, 1\)"),
    ("fusion_identity_weight", -0.1, r"must be a number in \[0, 1\)"),
    ("fusion_identity_weight", float("nan"), r"\[0, 1\)"),
    ("fusion_lr_multiplier", 0.0, "must be a finite number > 0"),
    ("fusion_lr_multiplier", float("inf"), "finite number > 0"),
    ("global_spatial_logit_scale", "rsqrt", "must be one of none, sqrt"),
    ("local_spatial_activation", "relu", "must be one of none, sigmoid"),
    ("zero_init_residual", 1, "must be a bool"),
    ("zero_init_residual", True, "random initialisation only"),  # weights "imagenet"
])
def test_config_errors_name_field_rule_and_value(field, value, rule):
    cfg = ModelConfig(**{field: value})
    with pytest.raises(SettingError, match=rule) as info:
        cfg.validate()
    msg = str(info.value)
    assert msg.startswith(f"--{field} ") and f"received --{field}=" in msg
    assert isinstance(info.value, ValueError)


def test_build_descriptor_model_validates_first():
    with pytest.raises(SettingError, match="variant"):
        build_descriptor_model(ModelConfig(weights="none", variant="GLAM"))
    with pytest.raises(TypeError, match="ModelConfig"):
        build_descriptor_model({"variant": "global"})


def test_build_descriptor_model_passes_the_glam_settings(monkeypatch):
    """The fusion and logit-scale settings reach the "glam" layer (a two-layer stand-in
    backbone: the ResNet itself is tested below)."""
    def tiny_backbone(*args, **kwargs):
        return keras.Sequential([keras.Input((None, None, 3)),
                                 keras.layers.Conv2D(8, 3, strides=4, padding="same")],
                                name="backbone")

    monkeypatch.setattr(builder, "build_backbone", tiny_backbone)
    model = build_descriptor_model(ModelConfig(
        weights="none", reduced_channels=4, embedding_dim=8, fusion_identity_weight=0.8,
        fusion_lr_multiplier=10.0, global_spatial_logit_scale="sqrt",
        local_spatial_activation="sigmoid"))
    glam = model.get_layer("glam")
    assert (glam.fusion_identity_weight, glam.fusion_lr_multiplier,
            glam.global_spatial_logit_scale) == (0.8, 10.0, "sqrt")
    assert glam.global_spatial.logit_scale == "sqrt"
    assert glam.local_spatial.activation == "sigmoid"
    np.testing.assert_allclose(np.asarray(glam.fusion_weights()), [0.1, 0.1, 0.8], atol=1e-6)
    default = build_descriptor_model(ModelConfig(weights="none", reduced_channels=4,
                                                 embedding_dim=8)).get_layer("glam")
    assert (default.fusion_identity_weight, default.fusion_lr_multiplier,
            default.global_spatial.logit_scale) == (0.0, 1.0, "none")


@pytest.fixture
def offline_keras_cache(tmp_path, monkeypatch):
    """Empty Keras cache dir, and any download fails at once like on an offline machine
    (the weights URL points into a folder that does not exist: urllib raises URLError)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(backbone_lib, "IMAGENET_WEIGHTS_URL",
                        (tmp_path / "offline").as_uri() + "/")
    return tmp_path / "keras_home" / "models"


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_imagenet_weights_offline_error_names_file_and_fixes(offline_keras_cache, name):
    file_name = imagenet_weights_file(name)
    assert file_name == f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert not (offline_keras_cache / file_name).exists()
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone(name, "imagenet")
    msg = str(info.value)
    assert f"~/.keras/models/{file_name}" in msg
    assert str(offline_keras_cache) in msg
    assert "--weights=none" in msg and "--weights=/path/to/" in msg
    assert not (offline_keras_cache / file_name).exists()


def test_imagenet_weights_are_read_from_the_keras_cache(offline_keras_cache, monkeypatch,
                                                        tmp_path):
    """A file placed at <keras home>/models/<file> is used without any download (the same
    loader serves --weights=<path>)."""
    source = build_backbone("resnet50", "none", model_name="source")
    offline_keras_cache.mkdir(parents=True)
    path = offline_keras_cache / imagenet_weights_file("resnet50")
    # A legacy .h5 file (model.save to a .h5 path): its "model_weights" group has the
    # layout of the Keras ImageNet files, and load_weights reads it the same way.
    source.save(path)
    monkeypatch.setitem(backbone_lib.IMAGENET_NOTOP_MD5, "resnet50", None)  # any file goes
    model = build_backbone("resnet50", "imagenet")
    for a, b in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_path_errors(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(BackboneWeightsError, match="not found.*nope.h5"):
        build_backbone("resnet50", str(missing))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file")
    with pytest.raises(BackboneWeightsError, match=r"garbage\.h5' could not be read as HDF5"):
        build_backbone("resnet50", str(garbage))
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    wrong = tmp_path / "other.weights.h5"
    other.save_weights(wrong)
    with pytest.raises(BackboneWeightsError, match="--backbone / --weights"):
        build_backbone("resnet50", str(wrong))
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet18", "none")


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    model = build_backbone("resnet50", "none", zero_init_residual=True)
    gammas = {l.name: np.asarray(l.gamma) for l in model.layers
              if isinstance(l, keras.layers.BatchNormalization)}
    last = [n for n in gammas if n.endswith("_3_bn")]
    assert len(last) == 16  # 3 + 4 + 6 + 3 bottleneck blocks
    assert all(not gammas[n].any() for n in last)
    assert all(gammas[n].min() == 1.0 for n in gammas if n not in last)
    names = ("conv2_block1_out", "conv2_block2_out", "conv3_block1_0_bn", "conv3_block1_out")
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    x = np.random.default_rng(0).uniform(-100, 100, (2, 64, 96, 3)).astype("float32")
    block1, block2, shortcut, block3 = (np.asarray(t) for t in probe(x, training=True))
    np.testing.assert_array_equal(block2, block1)  # identity block: relu(x + 0) = x
    np.testing.assert_allclose(block3, np.maximum(shortcut, 0.0), atol=1e-5)  # projection
    # The zeroed gammas are ordinary trainable weights: they get gradients.
    bn = model.get_layer("conv4_block2_3_bn")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grad = tape.gradient(loss, bn.gamma)
    assert bn.gamma.trainable and float(tf.reduce_max(tf.abs(grad))) > 0
    # With loaded weights the option is refused by ModelConfig; the backbone without it
    # keeps Keras' initialisation.
    plain = build_backbone("resnet50", "none")
    assert np.asarray(plain.get_layer("conv2_block1_3_bn").gamma).min() == 1.0


def test_resnet101_backbone_shape_and_params():
    model = build_backbone("resnet101", "none")
    assert model.name == "backbone"
    assert model.count_params() == 42_658_176
    assert tuple(model.output_shape) == (None, None, None, 2048)
    assert model.get_layer("conv5_block3_out") is not None
    y = model(np.zeros((1, 64, 96, 3), "float32"))
    assert tuple(y.shape) == (1, 2, 3, 2048)  # stride 32
