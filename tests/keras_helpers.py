"""Keras helpers shared by the tests (tests/helpers.py holds those without TensorFlow).

- `run_layer_test`: one runner for every glam_tf layer, after keras-hub's
  `TestCase.run_layer_test` (keras_hub/src/tests/test_case.py): build and call, output
  shape and dtype, get_config/from_config (and JSON serialisation) round trip, `.keras`
  save/load of a functional model around the layer, dtype policies.
- `tiny_keras_model`: a small SavedModel-exportable descriptor model for evaluation tests.
- Training: `tiny_descriptor_model` (a fast stand-in for build_descriptor_model) and
  `DRIVER` (train_main with that model, for subprocess tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import keras
import numpy as np

from glam_tf.config import DataConfig, TrainConfig
from glam_tf.model import EmbeddingHead, GeM, ModelConfig, all_layers
from glam_tf.model.builder import glam_module
from helpers import TESTS_DIR


# ----------------------------------------------------------------------------- layers

def _as_tuple(input_data):
    return tuple(input_data) if isinstance(input_data, (tuple, list)) else (input_data,)


def _call(layer, inputs, call_kwargs):
    return layer(*inputs, **call_kwargs)


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _perturb_weights(layer, seed):
    """Moves every weight by U[0, 0.1): the round trips then compare weights that differ
    from any initialiser. A non-negative shift keeps BatchNorm variances > 0 and GeM p >= 1."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(_numpy(v) + rng.uniform(0.0, 0.1, v.shape).astype(_numpy(v).dtype))


def run_layer_test(layer_cls, init_kwargs, input_data, *, call_kwargs=None,
                   expected_output_shape=None, expected_output_dtype="float32",
                   mixed_output_dtype=None, run_saving_test=True, run_precision_test=True,
                   atol=1e-6):
    """Checks a layer the way keras-hub's `TestCase.run_layer_test` does.

    1. Build and call: `layer_cls(**init_kwargs)(*inputs, **call_kwargs)`; output shape
       and dtype; a symbolic call on `keras.Input`s with an unknown batch gives the same
       shape (batch None) and dtype.
    2. Config: `from_config(get_config())` gives the same config, and a JSON round trip
       of `keras.saving.serialize_keras_object` gives the registered class back; with the
       same weights (perturbed away from the initialisers) the clone's output is the same.
    3. Saving: a functional model wrapping the layer, saved to `.keras` and loaded, holds
       an instance of `layer_cls` and gives the same output.
    4. Dtype policies: under "float32" and "mixed_bfloat16", every weight of the layer and
       of its sublayers has the policy's variable dtype, the layer and its sublayers
       compute in the policy's compute dtype, and the output is finite with the expected
       dtype.

    Args:
        layer_cls: a registered keras.layers.Layer subclass.
        init_kwargs: constructor arguments (without `dtype`).
        input_data: one array, or a tuple of arrays passed positionally (ArcFace takes
            embeddings and labels).
        call_kwargs: extra keyword arguments of every call (e.g. `training=False`).
        expected_output_shape: the output shape for `input_data`; None: not checked.
        expected_output_dtype: output dtype under the default float32 policy.
        mixed_output_dtype: output dtype under mixed_bfloat16; None: the compute dtype,
            "bfloat16" (pass "float32" for layers whose output is float32 by contract).
        run_saving_test: False skips step 3.
        run_precision_test: False skips step 4.
        atol: tolerance of the round-trip comparisons.

    Returns:
        The layer built and called in step 1 (weights perturbed).
    """
    call_kwargs = dict(call_kwargs or {})
    inputs = tuple(np.asarray(x) for x in _as_tuple(input_data))

    # 1. build, call, shapes and dtypes
    layer = layer_cls(**init_kwargs)
    output = _call(layer, inputs, call_kwargs)
    assert layer.built
    if expected_output_shape is not None:
        assert tuple(output.shape) == tuple(expected_output_shape), output.shape
    assert keras.backend.standardize_dtype(output.dtype) == expected_output_dtype
    symbolic_inputs = [keras.Input(shape=x.shape[1:], dtype=str(x.dtype)) for x in inputs]
    symbolic = _call(layer_cls(**init_kwargs), symbolic_inputs, call_kwargs)
    assert tuple(symbolic.shape) == (None,) + tuple(output.shape[1:]), symbolic.shape
    assert keras.backend.standardize_dtype(symbolic.dtype) == expected_output_dtype
    _perturb_weights(layer, seed=0)
    output = _numpy(_call(layer, inputs, call_kwargs))

    # 2. config round trip, same weights -> same output
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is layer_cls and revived.get_config() == config
    _call(clone, inputs, call_kwargs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(_numpy(_call(clone, inputs, call_kwargs)), output, atol=atol)

    # 3. .keras save/load of a functional model around the layer
    if run_saving_test:
        symbolic_inputs = [keras.Input(shape=x.shape[1:], dtype=str(x.dtype)) for x in inputs]
        model = keras.Model(symbolic_inputs, _call(layer, symbolic_inputs, call_kwargs))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "layer.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
        assert [type(l) for l in loaded.layers if isinstance(l, layer_cls)] == [layer_cls]
        np.testing.assert_allclose(_numpy(loaded(list(inputs))), output, atol=atol)

    # 4. dtype policies
    if run_precision_test:
        for policy_name in ("float32", "mixed_bfloat16"):
            policy = keras.DTypePolicy(policy_name)
            mixed = layer_cls(**init_kwargs, dtype=policy)
            out = _call(mixed, inputs, call_kwargs)
            for sublayer in all_layers(mixed):
                assert sublayer.compute_dtype == policy.compute_dtype, sublayer.name
                for v in sublayer.weights:
                    assert v.dtype == policy.variable_dtype, v.path
            expected = expected_output_dtype if policy_name == "float32" else (
                mixed_output_dtype or policy.compute_dtype)
            assert keras.backend.standardize_dtype(out.dtype) == expected, (policy_name,
                                                                            out.dtype)
            assert np.all(np.isfinite(_numpy(keras.ops.cast(out, "float32"))))
    return layer


# ----------------------------------------------------------------------------- models

def tiny_keras_model():
    """(B, H, W, 3) -> (B, 8) unit rows: global average pool, a seeded Dense, L2."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dense(8, kernel_initializer=keras.initializers.RandomNormal(seed=1))(x)
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


# ----------------------------------------------------------------------------- training

TINY_CHANNELS = 16


def tiny_descriptor_model(config: ModelConfig) -> keras.Model:
    """Conv(8, s2)-BN-ReLU-Conv(16, s2)-BN-ReLU -> GLAM(config.variant) -> GeM -> head.

    A stand-in for glam_tf.model.build_descriptor_model in training tests where the
    backbone does not matter: same contract (input "image" float32 (B, H, W, 3) in
    [0, 255], output (B, D) unit rows, sublayers "backbone", "glam", "gem", "head"), with a
    two-conv backbone instead of a ResNet, so a training step traces in about a second
    instead of ~20 s. The backbone has BatchNormalization layers, so synchronized batch
    norm is exercised. GLAM, GeM and the head are the real glam_tf.model layers.

    Args:
        config: the GLAM settings (variant, reduced_channels capped at 8, kernel_size,
            dilations, zero_init_attention, fusion_identity_weight, fusion_lr_multiplier,
            global_spatial_logit_scale, local_spatial_activation), gem_p, gem_eps, embedding_dim and dropout are used
            (backbone, weights and zero_init_residual are ignored).

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
        x = glam_module(dataclasses.replace(
            config, reduced_channels=min(config.reduced_channels, 8)))(x)
    x = GeM(p=config.gem_p, eps=config.gem_eps, name="gem")(x)
    x = EmbeddingHead(config.embedding_dim, dropout=config.dropout, name="head")(x)
    return keras.Model(image, x, name="tiny_" + config.variant.replace("+", "_"))


# The model config of the training tests: small enough for tiny_descriptor_model's shapes.
TINY_MODEL = ModelConfig(backbone="resnet50", weights="none", reduced_channels=8,
                         embedding_dim=16)


def tiny_train_config(train_dir, **changes) -> TrainConfig:
    """A seconds-long training run on the random stand-in data (6 classes, 32x48 images,
    batch 8, 6 SGD steps), with `changes` replacing fields."""
    base = dict(train_dir=str(train_dir), model=TINY_MODEL, data_source="random",
                num_classes=6, random_image_size=(32, 48),
                data=DataConfig(file_pattern="", global_batch_size=8), optimizer="sgd",
                learning_rate=0.05, train_steps=6, checkpoint_every=3, log_every=2,
                summary_every=1, export=False)
    return TrainConfig(**{**base, **changes})


# `python -c DRIVER --flag=...` from the repository root: train_main with the stand-in
# model, for subprocess tests (real flag parsing, strategy, signals and exit codes; a model
# that traces fast).
DRIVER = (
    "import sys\n"
    f"sys.path.insert(0, {TESTS_DIR!r})\n"
    "from glam_tf import refusal\n"
    "import train_main\n"
    "from keras_helpers import tiny_descriptor_model\n"
    "refusal.run(lambda argv: train_main.main(argv, model_fn=tiny_descriptor_model),\n"
    "            'train_main')\n"
)
