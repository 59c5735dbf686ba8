"""Training-free inference options, each against an independent NumPy reference: regional
GeM (the RegionalGeM layer), GeM with another p than trained and regional GeM inside the
descriptor model (glam_tf.model.inference_model), the serving module's max scale
aggregation; recorded in glam_export.json; off by default (the model itself)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from glam_tf.config import EvalConfig, ExportConfig, ModelConfig, SettingError, TrainConfig
from glam_tf.eval import models
from glam_tf.export import serving
from glam_tf.model import RegionalGeM, inference_model
from keras_helpers import run_layer_test, tiny_descriptor_model


def ref_regional_gem(x, p=2.5, size=5, eps=1e-6):
    """Loop over positions: mean of x and the power mean of its reflected size x size window
    (numpy's "reflect", which reflects again when the map is smaller than the window)."""
    x = np.asarray(x, np.float64)
    h = size // 2
    padded = np.pad(np.maximum(x, eps), ((0, 0), (h, h), (h, h), (0, 0)), mode="reflect")
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            window = padded[:, i:i + size, j:j + size, :]
            pooled = np.mean(window ** p, axis=(1, 2)) ** (1.0 / p)
            out[:, i, j, :] = 0.5 * x[:, i, j, :] + 0.5 * pooled
    return out


def ref_gem(x, p, eps=1e-6):
    return np.mean(np.maximum(np.asarray(x, np.float64), eps) ** p, axis=(1, 2)) ** (1.0 / p)


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ RegionalGeM layer

def test_regional_gem_layer_basics():
    x = np.random.default_rng(0).uniform(-0.5, 2.0, (2, 6, 7, 4)).astype(np.float32)
    run_layer_test(RegionalGeM, {"p": 2.5, "size": 5}, x, expected_output_shape=x.shape,
                   mixed_output_dtype="bfloat16")


@pytest.mark.parametrize("shape,p,size", [((2, 6, 7, 3), 2.5, 5), ((1, 4, 9, 2), 3.0, 3),
                                          ((1, 3, 3, 5), 2.5, 5), ((1, 2, 1, 3), 2.5, 5),
                                          ((1, 1, 4, 2), 2.5, 7)])
def test_regional_gem_matches_numpy(shape, p, size):
    x = np.random.default_rng(1).uniform(-0.2, 3.0, shape).astype(np.float32)
    got = RegionalGeM(p=p, size=size)(x)
    np.testing.assert_allclose(np.asarray(got), ref_regional_gem(x, p, size), rtol=1e-5,
                               atol=1e-6)


def test_regional_gem_keeps_a_constant_map_and_rejects_bad_arguments():
    x = np.full((1, 5, 6, 3), 0.7, np.float32)
    np.testing.assert_allclose(np.asarray(RegionalGeM()(x)), x, rtol=1e-6)
    with pytest.raises(ValueError, match="`size` must be an odd positive integer"):
        RegionalGeM(size=4)
    with pytest.raises(ValueError, match="`p` must be > 0"):
        RegionalGeM(p=0)


def test_regional_gem_unknown_spatial_size_in_a_graph():
    fn = tf.function(lambda t: RegionalGeM()(t),
                     input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for shape in ((1, 1, 1, 3), (2, 2, 5, 3), (1, 7, 3, 3)):
        x = np.random.default_rng(5).uniform(0, 2, shape).astype(np.float32)
        np.testing.assert_allclose(fn(x).numpy(), ref_regional_gem(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ inference_model

@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    model = tiny_descriptor_model(ModelConfig(variant="global+local", embedding_dim=8))
    model.get_layer("gem").p.assign([3.2])
    return model


def _features(model, images):
    """The map GeM pools: image -> preprocess -> backbone -> glam (the trained layers)."""
    x = model.get_layer("preprocess")(images)
    return np.asarray(model.get_layer("glam")(model.get_layer("backbone")(x)))


@pytest.mark.parametrize("gem_p,regional", [(4.6, False), (0.0, True), (4.6, True)])
def test_inference_model_matches_numpy(tiny, gem_p, regional):
    images = np.random.default_rng(2).uniform(0, 255, (2, 40, 48, 3)).astype(np.float32)
    got = np.asarray(inference_model(tiny, gem_p=gem_p, regional_gem=regional)(images))
    feats = _features(tiny, images)
    if regional:
        feats = ref_regional_gem(feats)
    pooled = ref_gem(feats, gem_p or 3.2)
    want = np.asarray(tiny.get_layer("head")(pooled.astype(np.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, np.asarray(tiny(images)), atol=1e-4)  # the option matters
    assert float(np.asarray(tiny.get_layer("gem").p)[0]) == pytest.approx(3.2)  # untouched


def test_inference_model_off_is_the_model_itself(tiny):
    assert inference_model(tiny) is tiny
    other = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="lacks"):
        inference_model(other, gem_p=4.0)


# ------------------------------------------------------------------ serving and records

def test_serving_max_scale_aggregation_and_options(tiny):
    scales = (0.70710678, 1.0)
    image = np.random.default_rng(3).integers(0, 256, (50, 64, 3), dtype=np.uint8)
    module = serving.build_serving_module(tiny, scales=scales, max_image_size=64,
                                          scale_aggregation="max", inference_gem_p=4.6,
                                          regional_gem=True)
    rows = module.serving_default(tf.constant(image), tf.constant(scales, tf.float32),
                                  tf.constant([0, 1], tf.int32))["global_descriptors"].numpy()
    ref_model = inference_model(tiny, gem_p=4.6, regional_gem=True)
    for row, s in zip(rows, scales):   # each scale's row is the optioned model's
        size = [int(np.round(np.float32(n) * np.float32(s))) for n in image.shape[:2]]
        resized = tf.image.resize(image[None].astype(np.float32), size, method="bilinear")
        np.testing.assert_allclose(row, np.asarray(ref_model(resized))[0], atol=1e-5)
    got = module.global_descriptor(tf.constant(image))["global_descriptor"].numpy()
    np.testing.assert_allclose(got, _l2n(_l2n(rows).max(axis=0)), atol=1e-5)
    mean_module = serving.build_serving_module(tiny, scales=scales, max_image_size=64)
    got_mean = mean_module.global_descriptor(tf.constant(image))["global_descriptor"].numpy()
    rows_mean = mean_module.serving_default(
        tf.constant(image), tf.constant(scales, tf.float32),
        tf.constant([0, 1], tf.int32))["global_descriptors"].numpy()
    np.testing.assert_allclose(got_mean, _l2n(rows_mean.mean(axis=0)), atol=1e-5)
    batched = module.batched_global_descriptors(tf.constant(image[None]))
    np.testing.assert_allclose(batched["global_descriptors"].numpy()[0], got, atol=1e-5)


def test_options_recorded_in_export_json_and_eval_flags(tiny, tmp_path):
    cfg = ExportConfig(scales=(1.0,), max_image_size=64, inference_gem_p=4.6,
                       regional_gem=True, scale_aggregation="max")
    path = serving.export_saved_model(tiny, tmp_path / "export", cfg)
    with open(f"{path}/assets.extra/glam_export.json") as f:
        info = json.load(f)
    assert (info["inference_gem_p"], info["regional_gem"], info["scale_aggregation"]) == (
        4.6, True, "max")
    assert ExportConfig().info()["inference_gem_p"] == 0.0
    with pytest.raises(SettingError, match=r"--inference_gem_p must be 0 \(the trained p\)"):
        ExportConfig(inference_gem_p=0.5).validate()
    base = dict(dataset="synth", data_root="d", output_dir="o")
    with pytest.raises(SettingError, match=r"--regional_gem applies to a --train_dir"):
        EvalConfig(model="m", inference=ExportConfig(regional_gem=True), **base).validate(
            check_model=False)
    # a back-end of an in-memory model: the options go into its info and fingerprint
    backend = models.from_keras_model(tiny, scales=(1.0,), max_image_size=64,
                                      inference=ExportConfig(inference_gem_p=4.6))
    plain = models.from_keras_model(tiny, scales=(1.0,), max_image_size=64)
    assert backend.info["inference"] == {"inference_gem_p": 4.6}
    assert backend.fingerprint != plain.fingerprint and "inference" not in plain.info
    image = np.random.default_rng(4).integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    want = np.asarray(inference_model(tiny, gem_p=4.6)(image.astype(np.float32)))
    np.testing.assert_allclose(backend(image), want, atol=1e-5)


def test_bfloat16_export_keeps_regional_gem_in_float32(tiny):
    image = np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    f32 = serving.build_serving_module(tiny, scales=(1.0,), max_image_size=64,
                                       regional_gem=True, inference_gem_p=4.6)
    bf16 = serving.build_serving_module(tiny, scales=(1.0,), max_image_size=64,
                                        regional_gem=True, inference_gem_p=4.6,
                                        precision="bfloat16")
    a = f32.global_descriptor(tf.constant(image))["global_descriptor"].numpy()
    b = bf16.global_descriptor(tf.constant(image))["global_descriptor"].numpy()
    assert float(np.dot(a, b)) > 0.99


def test_training_evaluates_with_the_exports_inference_options():
    cfg = TrainConfig(train_dir="t", export_settings=ExportConfig(regional_gem=True))
    assert cfg.evaluation_at(5).inference.regional_gem
    assert not TrainConfig(train_dir="t").evaluation_at(5).inference.regional_gem
