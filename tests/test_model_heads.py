"""GeM, embedding head, ArcFace and preprocessing against NumPy references."""

import math

import numpy as np
import pytest
import tensorflow as tf
import keras

from glam_tf.model import (
    ArcFace,
    CaffePreprocess,
    EmbeddingHead,
    GeM,
    arcface_logits,
    gem,
    l2_normalize,
)
from keras_helpers import run_layer_test


# ----------------------------------------------------------------------------- GeM

@pytest.fixture(autouse=True)
def seeded():
    """Deterministic Keras initialisers (the assertions hold for any init; this keeps
    failures reproducible)."""
    keras.utils.set_random_seed(0)


def np_gem(x, p, eps):
    return np.mean(np.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def test_gem_function_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 6)).astype("float32")  # negatives too
    for p in (1.0, 3.0, 4.5):
        np.testing.assert_allclose(np.asarray(gem(x, p, 1e-6)), np_gem(x, p, 1e-6),
                                   rtol=1e-5, atol=1e-6)
    # p = 1 on positive input is average pooling.
    xp = np.abs(x) + 0.1
    np.testing.assert_allclose(np.asarray(gem(xp, 1.0, 1e-6)), xp.mean(axis=(1, 2)),
                               rtol=1e-5)


def test_gem_layer_learnable_p():
    x = np.random.default_rng(1).uniform(0, 2, size=(2, 4, 3, 8)).astype("float32")
    layer = GeM(p=3.0, eps=1e-6, name="gem")
    y = layer(x)
    np.testing.assert_allclose(np.asarray(layer.p), [3.0])
    assert layer.p.trainable
    np.testing.assert_allclose(np.asarray(y), np_gem(x, 3.0, 1e-6), rtol=1e-5)
    layer.p.assign([2.2])
    np.testing.assert_allclose(np.asarray(layer(x)), np_gem(x, 2.2, 1e-6), rtol=1e-5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    grad = tape.gradient(loss, layer.p)
    assert np.all(np.isfinite(grad)) and abs(float(grad[0])) > 0
    assert layer.compute_output_shape((None, None, None, 8)) == (None, 8)
    with pytest.raises(ValueError, match="p"):
        GeM(p=0.0)


def test_gem_layer_basics():
    """Shapes, config and .keras round trips (same outputs), float32 and mixed_bfloat16."""
    x = np.random.default_rng(1).uniform(0, 2, size=(2, 4, 3, 8)).astype("float32")
    run_layer_test(GeM, {"p": 3.0, "eps": 1e-6}, x, expected_output_shape=(2, 8))


def test_gem_gradient_finite_on_zero_features():
    x = np.zeros((1, 2, 2, 3), "float32")
    layer = GeM()
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt))
    grads = tape.gradient(loss, [xt, layer.p])
    assert all(np.all(np.isfinite(g)) for g in grads)


def decimal_gem(column, p, eps):
    """GeM of one channel and its derivative in p, in 60-digit decimal arithmetic.

    Independent of float ranges: eps**p and x**p are formed exactly as the definition says,
    at any p, so the reference stays valid where float32 and float64 underflow.
    """
    import decimal  # noqa: PLC0415

    ctx = decimal.Context(prec=60, Emin=-10**9, Emax=10**9)
    D = ctx.create_decimal
    xs = [max(D(repr(float(v))), D(repr(eps))) for v in np.ravel(column)]

    def f(q):
        mean = ctx.divide(sum((ctx.power(v, q) for v in xs), D(0)), D(len(xs)))
        return ctx.power(mean, ctx.divide(D(1), q))

    q = D(repr(p))
    h = D("1e-20")
    grad = ctx.divide(f(q + h) - f(q - h), 2 * h)
    return float(f(q)), float(grad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("p", [1.0, 3.0, 6.5, 10.0, 40.0, 200.0])
def test_gem_value_and_gradient_finite_and_exact_at_every_p(p, dtype):
    # Channel 0 is <= eps everywhere (eps^p underflowed to 0 and gave d/dp = NaN above
    # p ~ 6.4 before the log-space form); channel 1 has large activations (x^p overflowed).
    rng = np.random.default_rng(3)
    x = np.stack([np.full((3, 4), -1.0), rng.uniform(0.0, 60.0, (3, 4)),
                  rng.uniform(0.0, 1.0, (3, 4))], axis=-1)[np.newaxis].astype("float32")
    if dtype == "bfloat16":
        x = np.asarray(tf.cast(tf.cast(x, tf.bfloat16), tf.float32))
    layer = GeM(p=p, eps=1e-6, dtype=keras.DTypePolicy(
        "mixed_bfloat16" if dtype == "bfloat16" else "float32"))
    xt = tf.cast(tf.constant(x), dtype)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(tf.cast(y, tf.float32))
    grad_x, grad_p = tape.gradient(loss, [xt, layer.p])
    assert np.all(np.isfinite(np.asarray(tf.cast(grad_x, tf.float32))))
    assert np.all(np.isfinite(np.asarray(grad_p)))
    expected = [decimal_gem(x[0, :, :, c], p, 1e-6) for c in range(x.shape[-1])]
    value_tol = 1e-2 if dtype == "bfloat16" else 1e-4   # bfloat16 output: 8-bit mantissa
    np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32))[0],
                               [v for v, _ in expected], rtol=value_tol)
    np.testing.assert_allclose(float(grad_p[0]), sum(g for _, g in expected),
                               rtol=2e-2 if dtype == "bfloat16" else 1e-3, atol=1e-6)


def test_gem_p_is_kept_at_least_one_by_the_optimizer():
    x = tf.constant(np.random.default_rng(4).uniform(0, 2, (2, 3, 3, 4)), tf.float32)
    layer = GeM(p=1.05)
    layer(x)
    optimizer = keras.optimizers.SGD(learning_rate=10.0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer.p)   # d loss / d p = 1: one step moves p by -10
    optimizer.apply_gradients(zip(tape.gradient(loss, [layer.p]), [layer.p]))
    assert float(layer.p[0]) == 1.0   # 1.05 - 10 projected back to the minimum
    with pytest.raises(ValueError, match=">= 1"):
        GeM(p=0.5)


# ----------------------------------------------------------------------------- head

def test_embedding_head_matches_numpy_and_is_unit_norm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 32)).astype("float32")
    head = EmbeddingHead(embedding_dim=8, dropout=0.1, name="head")
    head.build(x.shape)
    assert [head.dense.name, head.bn.name] == ["head_dense", "head_bn"]
    assert head.dense.bias is None  # the BatchNorm's beta is the bias
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    mean, var = rng.normal(size=8), rng.uniform(0.5, 2.0, size=8)
    head.bn.set_weights([a.astype("float32") for a in (gamma, beta, mean, var)])
    y = np.asarray(head(x, training=False))
    z = x.astype(np.float64) @ np.asarray(head.dense.kernel, np.float64)
    z = gamma * (z - mean) / np.sqrt(var + head.bn.epsilon) + beta
    ref = z / np.linalg.norm(z, axis=1, keepdims=True)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_embedding_head_basics():
    """Round trips and policies; the descriptor stays float32 under mixed_bfloat16."""
    x = np.random.default_rng(2).normal(size=(3, 32)).astype("float32")
    run_layer_test(EmbeddingHead, {"embedding_dim": 8, "dropout": 0.1}, x,
                   call_kwargs={"training": False}, expected_output_shape=(3, 8),
                   mixed_output_dtype="float32")


def test_l2_normalize_zero_row_stays_finite():
    y = np.asarray(l2_normalize(np.array([[0.0, 0.0], [3.0, 4.0]], "float32")))
    np.testing.assert_allclose(y, [[0.0, 0.0], [0.6, 0.8]], atol=1e-6)


# ----------------------------------------------------------------------------- ArcFace

def np_arcface(cosine, labels, m, s):
    """Reference via the angle itself: s*cos(theta+m) on the true class when theta+m <= pi,
    else s*(cos theta - m sin m); s*cos theta elsewhere."""
    cosine = np.clip(cosine.astype(np.float64), -1, 1)
    out = cosine.copy()
    for b, y in enumerate(labels):
        theta = math.acos(cosine[b, y])
        out[b, y] = (math.cos(theta + m) if theta + m <= math.pi
                     else cosine[b, y] - m * math.sin(m))
    return s * out


MARGIN, SCALE = 0.3, 30.0
# Rows: cos = +1, cos = -1 (theta + m > pi), cos in the fallback region, ordinary values,
# and values one float32 ulp inside +-1.
COSINE = np.array([
    [1.0, 0.2, -0.5, 0.0],
    [-1.0, 0.3, 0.9, -0.2],
    [0.1, -0.98, 0.4, 0.7],
    [0.5, -0.3, 0.8, 0.25],
    [0.99999994, -0.99999994, 0.0, 0.3],
], "float32")
LABELS = np.array([0, 0, 1, 2, 1], "int32")


def test_arcface_logits_match_numpy_including_edges():
    assert -0.98 < math.cos(math.pi - MARGIN)  # row 2's target is in the fallback region
    got = np.asarray(arcface_logits(COSINE, LABELS, MARGIN, SCALE))
    ref = np_arcface(COSINE, LABELS, MARGIN, SCALE)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got[0, 0], SCALE * math.cos(MARGIN), atol=1e-4)
    np.testing.assert_allclose(got[1, 0], SCALE * (-1 - MARGIN * math.sin(MARGIN)), atol=1e-4)
    # Non-target entries are s*cos theta.
    mask = np.ones_like(COSINE, bool)
    mask[np.arange(len(LABELS)), LABELS] = False
    np.testing.assert_allclose(got[mask], SCALE * COSINE[mask], atol=1e-5)


def test_arcface_gradients_finite_at_cos_plus_minus_one():
    cos = tf.Variable(COSINE)
    with tf.GradientTape() as tape:
        logits = arcface_logits(cos, LABELS, MARGIN, SCALE)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(LABELS, logits, from_logits=True))
    grad = np.asarray(tape.gradient(loss, cos))
    assert np.all(np.isfinite(grad)), grad
    assert np.all(np.isfinite(np.asarray(logits)))
    # Ordinary rows keep a real gradient through the margin term.
    assert abs(grad[3, 2]) > 0


def test_arcface_layer_cosine_logits_and_gradients():
    rng = np.random.default_rng(4)
    layer = ArcFace(num_classes=6, margin=MARGIN, scale=SCALE, name="arcface")
    emb = rng.normal(size=(4, 5)).astype("float32")
    labels = np.array([0, 3, 5, 3], "int32")
    logits = np.asarray(layer(emb, labels))
    assert logits.shape == (4, 6)
    w = np.asarray(layer.centers, np.float64)
    assert w.shape == (6, 5)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(np.asarray(layer.cosine(emb)), cos, atol=1e-5)
    np.testing.assert_allclose(logits, np_arcface(cos, labels, MARGIN, SCALE), atol=1e-4)
    # An embedding equal to its (scaled) class centre gives cos = 1: finite gradients.
    emb_edge = tf.Variable(np.stack([w[0] * 3.0, -w[1], w[2], w[3]]).astype("float32"))
    lab_edge = np.array([0, 1, 2, 3], "int32")
    with tf.GradientTape() as tape:
        out = layer(emb_edge, lab_edge)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            lab_edge, out, from_logits=True))
    grads = tape.gradient(loss, [emb_edge, layer.centers])
    assert all(np.all(np.isfinite(g)) for g in grads)
    # float32 cosines of equal directions land within ~1e-7 of 1, i.e. theta up to ~5e-4
    # rad: s*cos(theta + m) is then within s*sin(m)*5e-4 ~ 5e-3 of s*cos(m).
    np.testing.assert_allclose(np.asarray(out)[0, 0], SCALE * math.cos(MARGIN), atol=1e-2)
    assert layer.get_config()["num_classes"] == 6


def test_arcface_layer_basics():
    """Two inputs (embeddings, labels); the logits stay float32 under mixed_bfloat16."""
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(4, 5)).astype("float32")
    labels = np.array([0, 3, 5, 3], "int32")
    run_layer_test(ArcFace, {"num_classes": 6, "margin": MARGIN, "scale": SCALE},
                   (emb, labels), expected_output_shape=(4, 6), mixed_output_dtype="float32",
                   atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 3, "margin": 2.0}, "margin"),
    ({"num_classes": 3, "scale": 0.0}, "scale"),
])
def test_arcface_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArcFace(**kwargs)


# ----------------------------------------------------------------------------- preprocessing

def test_caffe_preprocess_matches_keras_applications():
    x = np.random.default_rng(5).uniform(0, 255, size=(2, 7, 9, 3)).astype("float32")
    expected = keras.applications.resnet.preprocess_input(x.copy())
    got = np.asarray(CaffePreprocess()(x))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # By hand: BGR order minus the means.
    np.testing.assert_allclose(got[..., 0], x[..., 2] - 103.939, atol=1e-4)
    with pytest.raises(ValueError, match="RGB"):
        CaffePreprocess().build((None, 8, 8, 1))


def test_caffe_preprocess_basics():
    """Round trips (the name survives from_config) and dtype policies."""
    x = np.random.default_rng(5).uniform(0, 255, size=(2, 7, 9, 3)).astype("float32")
    layer = run_layer_test(CaffePreprocess, {"name": "pre"}, x,
                           expected_output_shape=(2, 7, 9, 3))
    assert CaffePreprocess.from_config(layer.get_config()).name == "pre"
