"""Export precision: bfloat16 / float16 signatures against float32.

A tiny GLAM model (tests/keras_helpers.tiny_descriptor_model: real GLAM, GeM and head on a
two-conv backbone) is exported once in bfloat16; a ResNet50 GLAM model (weights none) at
64-96 px checks the clone layer by layer and what computes in float32.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import export_main
from glam_tf import cpu
from glam_tf.config import ExportConfig, SettingError, TrainConfig, contract, settings
from glam_tf.export import precision, serving
from glam_tf.model import (EmbeddingHead, GeM, GlamModule, ModelConfig, all_layers,
                           build_descriptor_model)
from glam_tf.model import head as head_lib
from glam_tf.model import pooling
from keras_helpers import tiny_descriptor_model

MAX_SIZE = 64
SCALES = (0.70710678, 1.0)


def _images(n=3, seed=0):
    rng = np.random.RandomState(seed)
    # Smooth images (a few random blobs, upsampled): closer to photos than uniform noise.
    small = rng.uniform(0, 255, (n, 6, 8, 3)).astype(np.float32)
    big = tf.image.resize(small, (72, 96), method="bicubic").numpy()
    return np.clip(big, 0, 255).astype(np.uint8)


def _cosines(a, b):
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return tiny_descriptor_model(ModelConfig(weights="none", embedding_dim=32))


@pytest.fixture(scope="module")
def resnet_model():
    keras.utils.set_random_seed(0)
    return build_descriptor_model(ModelConfig(backbone="resnet50", weights="none",
                                              reduced_channels=16, embedding_dim=64))


def _fake_cpu(flags_text):
    return cpu.parse_cpuinfo(f"cpu family\t: 25\nmodel\t\t: 33\nmodel name\t: AMD EPYC 7B13"
                             f"\nflags\t\t: fpu sse2 {flags_text}\n")


@pytest.fixture(scope="module")
def bf16_export_logs(tiny_model, tmp_path_factory):
    """The bfloat16 export, made on a faked AVX2 CPU: (path, [(level, message)] logged)."""
    base = tmp_path_factory.mktemp("exports")
    logged = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving.cpu, "cpu_info", lambda: _fake_cpu("avx avx2 fma"))
        mp.setattr(serving.logging, "warning",
                   lambda fmt, *args: logged.append(("warning", fmt % args)))
        path = serving.export_saved_model(tiny_model, base, max_image_size=MAX_SIZE,
                                          scales=SCALES, precision="bfloat16")
    return path, logged


@pytest.fixture(scope="module")
def bf16_export(bf16_export_logs):
    return bf16_export_logs[0]


def test_bfloat16_export_on_a_cpu_without_native_bfloat16_warns(bf16_export_logs):
    _, logged = bf16_export_logs
    assert logged == [("warning", precision.precision_advice("bfloat16", _fake_cpu("avx2"))[1])]
    message = logged[0][1]
    assert message.startswith("export precision bfloat16: this CPU (AMD EPYC 7B13 (family 25 "
                              "model 33), AVX2) has no native bfloat16 (no avx512_bf16 or "
                              "amx_bf16 flag), so TensorFlow emulates it: measured on AVX2 ")
    assert "1.06x float32's speed by wall clock, 0.85x by CPU time: no gain" in message
    assert message.endswith("Choose the precision on the serving machine: python "
                            "bench/export_precision.py measures it there.")


@pytest.mark.parametrize("flags_text,warn,expect", [
    ("avx2 avx512f avx512_bf16", False, "computes bfloat16 natively (avx512_bf16 / amx_bf16); "
     "measured on AVX512-BF16 (AMD EPYC family 25 model 17 (Zen 4)"),
    ("avx2 avx512f avx512_bf16 amx_tile amx_bf16", False, "AMX) computes bfloat16 natively"),
    ("avx2 avx512f", True, "AVX-512) has no native bfloat16"),
])
def test_bfloat16_advice_by_instruction_set(flags_text, warn, expect):
    got_warn, message = precision.precision_advice("bfloat16", _fake_cpu(flags_text))
    assert got_warn is warn and expect in message
    m = precision.BFLOAT16_MEASURED["AVX512-BF16"]
    if not warn:
        assert f"{m.wall:.2f}x float32's speed by wall clock, {m.cpu_time:.2f}x by CPU" in message
    assert precision.precision_advice("float32", _fake_cpu(flags_text)) is None
    assert precision.precision_advice("float16", _fake_cpu(flags_text))[0] is False


# ---- export, signatures ----------------------------------------------------------------------
def test_export_records_the_precision(bf16_export):
    with open(os.path.join(bf16_export, contract.EXPORT_INFO_FILE)) as f:
        info = json.load(f)
    assert info["precision"] == "bfloat16"
    assert ExportConfig().info()["precision"] == "float32"


def test_every_signature_returns_float32_unit_descriptors(bf16_export, tiny_model):
    loaded = tf.saved_model.load(bf16_export)
    sigs = loaded.signatures
    images = _images(2)
    jpeg = tf.io.encode_jpeg(images[0], quality=95)
    outputs = {
        "serving_default": sigs["serving_default"](
            input_image=tf.constant(images[0]), input_scales=tf.constant(SCALES),
            input_global_scales_ind=tf.constant([0, 1]))["global_descriptors"],
        "global_descriptor": sigs["global_descriptor"](
            input_image=tf.constant(images[0]))["global_descriptor"],
        "batched_global_descriptors": sigs["batched_global_descriptors"](
            input_images=tf.constant(images))["global_descriptors"],
        "global_descriptor_from_bytes": sigs["global_descriptor_from_bytes"](
            image_bytes=tf.reshape(jpeg, [1]))["global_descriptors"],
    }
    float32 = serving.build_serving_module(tiny_model, max_image_size=MAX_SIZE, scales=SCALES)
    reference = float32.global_descriptor(tf.constant(images[0]))["global_descriptor"].numpy()
    for name, out in outputs.items():
        assert out.dtype == tf.float32, name
        x = np.atleast_2d(out.numpy())
        assert x.shape[-1] == 32 and np.isfinite(x).all(), name
        np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5, err_msg=name)
    # The same image through the bfloat16 and the float32 global_descriptor.
    assert _cosines(outputs["global_descriptor"].numpy(), reference) >= 0.99


def test_loaded_embed_takes_the_same_float32_input(bf16_export):
    loaded = tf.saved_model.load(bf16_export)
    out = loaded.embed(tf.cast(_images(2), tf.float32))
    assert out.dtype == tf.float32 and out.shape == (2, 32)


# ---- accuracy against float32 ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_low_precision_descriptors_are_close_to_float32(resnet_model, name):
    images = tf.constant(_images(3))
    module = {p: serving.build_serving_module(resnet_model, max_image_size=96, scales=(1.0,),
                                              precision=p)
              for p in ("float32", name)}
    out = {p: m.batched_global_descriptors(images)["global_descriptors"].numpy()
           for p, m in module.items()}
    assert out[name].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[name], axis=-1), 1.0, atol=1e-5)
    assert _cosines(out[name], out["float32"]).min() >= 0.99


def test_float32_is_the_default_export_bit_for_bit(tiny_model):
    assert precision.with_precision(tiny_model, "float32") is tiny_model
    images = tf.constant(_images(2))
    default = serving.build_serving_module(tiny_model, max_image_size=MAX_SIZE, scales=SCALES)
    explicit = serving.build_serving_module(tiny_model, max_image_size=MAX_SIZE, scales=SCALES,
                                            precision="float32")
    a = default.batched_global_descriptors(images)["global_descriptors"].numpy()
    b = explicit.batched_global_descriptors(images)["global_descriptors"].numpy()
    assert np.array_equal(a, b)
    assert explicit.config.precision == default.config.precision == "float32"


# ---- bad values ------------------------------------------------------------------------------
def test_bad_precision_names_the_flag(tiny_model, tmp_path):
    with pytest.raises(SettingError, match=r"^--precision must be one of float32, bfloat16, "
                                           r"float16; received --precision='fp16'"):
        serving.export_saved_model(tiny_model, tmp_path / "e", precision="fp16")
    assert not os.path.exists(tmp_path / "e")
    with pytest.raises(ValueError, match="--precision must be one of"):
        precision.with_precision(tiny_model, "mixed_bfloat16")
    with pytest.raises(SettingError, match=r"^--export_precision must be one of"):
        TrainConfig(train_dir="x", data_source="synthetic",
                    export_settings=ExportConfig(precision="half")).validate()


def test_export_main_has_the_precision_flag(tmp_path):
    fv = flags.FlagValues()
    export_main.define_flags(fv)
    fv(["export_main", f"--train_dir={tmp_path}", f"--export_dir={tmp_path / 'e'}",
        "--precision=bfloat16"])
    assert export_main.parse_flags(fv)["config"].precision == "bfloat16"
    names = {name for name, _, _ in settings.flag_fields(TrainConfig)}
    assert "export_precision" in names
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["export_main", "--precision=int8"])


# ---- what computes in float32 ----------------------------------------------------------------
def test_clone_keeps_weights_and_float32_layers(resnet_model):
    clone = precision.with_precision(resnet_model, "bfloat16")
    assert [w.path for w in clone.weights] == [w.path for w in resnet_model.weights]
    for a, b in zip(clone.weights, resnet_model.weights):
        assert a.dtype == "float32" and np.array_equal(np.asarray(a), np.asarray(b)), a.path
    by_class = {}
    for layer in all_layers(clone):
        by_class.setdefault(type(layer).__name__, set()).add(layer.compute_dtype)
    for float32_layer in ("GeM", "EmbeddingHead", "Dense", "Dropout"):   # Dense, Dropout: head
        assert by_class[float32_layer] == {"float32"}, float32_layer
    for low in ("Conv2D", "Conv1D", "GlamModule", "GlobalSpatialAttention",
                "GlobalChannelAttention", "CaffePreprocess"):
        assert by_class[low] == {"bfloat16"}, low
    head = [layer for layer in all_layers(clone) if isinstance(layer, EmbeddingHead)][0]
    assert head.bn.compute_dtype == "float32"
    # The original model is untouched.
    assert {layer.compute_dtype for layer in all_layers(resnet_model)} == {"float32"}


def test_softmaxes_gem_and_normalisation_compute_in_float32(resnet_model, monkeypatch):
    clone = precision.with_precision(resnet_model, "bfloat16")
    seen = {"softmax": [], "gem": [], "l2": []}
    softmax, gem, l2_normalize = keras.ops.softmax, pooling.gem, head_lib.l2_normalize

    def spy_softmax(x, *args, **kwargs):
        seen["softmax"].append(keras.backend.standardize_dtype(x.dtype))
        return softmax(x, *args, **kwargs)

    def spy_gem(x, p, eps=1e-6):
        seen["gem"].append((keras.backend.standardize_dtype(x.dtype),
                            keras.backend.standardize_dtype(p.dtype)))
        return gem(x, p, eps)

    def spy_l2(x, *args, **kwargs):
        seen["l2"].append(keras.backend.standardize_dtype(x.dtype))
        return l2_normalize(x, *args, **kwargs)

    monkeypatch.setattr(keras.ops, "softmax", spy_softmax)
    monkeypatch.setattr(pooling, "gem", spy_gem)
    monkeypatch.setattr(head_lib, "l2_normalize", spy_l2)
    out = clone(tf.constant(_images(2), tf.float32), training=False)   # eager: spies run
    # Global spatial softmax (over hw keys) and the fusion softmax (3 weights).
    assert seen["softmax"] == ["float32", "float32"]
    assert seen["gem"] == [("float32", "float32")]
    assert seen["l2"] == ["float32"]
    assert out.dtype == "float32"
    glam = clone.get_layer("glam")
    assert keras.backend.standardize_dtype(glam.fusion_weights().dtype) == "float32"


def test_gem_p_and_fusion_beta_are_not_rounded_to_bfloat16(monkeypatch):
    """p = 3.07 and beta = 0.123 are no bfloat16 numbers: read autocast, they would be."""
    mixed = keras.DTypePolicy("mixed_bfloat16")
    seen = {"p": [], "softmax": []}
    gem, softmax = pooling.gem, keras.ops.softmax

    def spy_gem(x, p, eps=1e-6):
        seen["p"].append(np.asarray(p).tolist())
        return gem(x, p, eps)

    def spy_softmax(x, *args, **kwargs):
        seen["softmax"].append(np.asarray(x).tolist())
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(pooling, "gem", spy_gem)
    x = np.random.RandomState(0).uniform(0.1, 4.0, (2, 3, 3, 8)).astype(np.float32)
    GeM(p=3.07, dtype=mixed)(x)
    assert seen["p"] == [[pytest.approx(3.07, abs=1e-6)]]
    module = GlamModule("local-channel", dtype=mixed)
    module.build((None, 3, 3, 8))
    module.fusion_beta.assign([0.123, -0.2])
    monkeypatch.setattr(keras.ops, "softmax", spy_softmax)
    module(x)
    assert seen["softmax"] == [[pytest.approx(0.123, abs=1e-7), pytest.approx(-0.2, abs=1e-7)]]
