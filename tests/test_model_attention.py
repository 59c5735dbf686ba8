"""GLAM attention layers and fusion against an independent NumPy implementation of the spec.

Every reference below is written from the spec (../shared/GLAM_SPEC.md) with explicit loops /
einsum and its own convolutions, fed with the layer's own weights; random non-square
inputs (B=2, h=5, w=7, c=16, c'=4).
"""

import numpy as np
import pytest
import keras

from glam_tf.model import (
    MODULE_VARIANTS,
    GlamModule,
    GlobalChannelAttention,
    GlobalSpatialAttention,
    LocalChannelAttention,
    LocalSpatialAttention,
)
from keras_helpers import run_layer_test

B, H, W, C, CP = 2, 5, 7, 16, 4
TOL = 1e-4


# ----------------------------------------------------------------------------- NumPy spec

def np_conv2d(x, kernel, bias=None, dilation=1):
    """Same-padded 2-D cross-correlation: x (B,H,W,Cin), kernel (kh,kw,Cin,Cout)."""
    kh, kw = kernel.shape[:2]
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[3],), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :]
            out += np.einsum("bhwc,cd->bhwd", patch, kernel[i, j])
    return out if bias is None else out + bias


def np_conv1d_channels(s, kernel, bias):
    """Same-padded 1-D cross-correlation along channels, one filter: s (B,C), kernel (k,1,1)."""
    k = kernel.shape[0]
    p = (k - 1) // 2
    sp = np.pad(s, ((0, 0), (p, p)))
    out = np.zeros_like(s, dtype=np.float64)
    for t in range(k):
        out += kernel[t, 0, 0] * sp[:, t:t + s.shape[1]]
    return out + bias[0]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def kb(conv):
    """(kernel, bias) of a keras conv as float64 NumPy; bias None when the conv has none."""
    bias = None if conv.bias is None else np.asarray(conv.bias, np.float64)
    return np.asarray(conv.kernel, np.float64), bias


def ref_local_channel(layer, f):
    """A_c^l (B,1,1,C) and eq. 1 output."""
    s = f.mean(axis=(1, 2))
    a = sigmoid(np_conv1d_channels(s, *kb(layer.conv)))[:, None, None, :]
    return a, f * a + f


def ref_local_spatial_map(layer, f):
    """A_s^l (B,H,W,1): 1x1 reduce, dilated 3x3 branches + 1x1 branch, concat, 1x1 -> 1."""
    fp = np_conv2d(f, *kb(layer.conv_reduce))
    branches = [np_conv2d(fp, *kb(conv), dilation=d)
                for conv, d in zip(layer.dilated_convs, layer.dilations)]
    branches.append(np_conv2d(fp, *kb(layer.conv_1x1)))
    return np_conv2d(np.concatenate(branches, axis=-1), *kb(layer.conv_out))


def ref_global_channel_map(layer, f, transposed=False):
    """a[b, i, j] = exp(kappa_i q_j) / sum_i' exp(kappa_i' q_j) (columns sum to 1)."""
    s = f.mean(axis=(1, 2))
    q = sigmoid(np_conv1d_channels(s, *kb(layer.conv_query)))
    kappa = sigmoid(np_conv1d_channels(s, *kb(layer.conv_key)))
    a = np.zeros((f.shape[0], f.shape[-1], f.shape[-1]))
    for b in range(f.shape[0]):
        for j in range(f.shape[-1]):
            col = np.exp(kappa[b, :] * q[b, j])
            a[b, :, j] = col / col.sum()
        if transposed:  # the wrong direction: softmax over the query index j
            logits = kappa[b, :, None] * q[b, None, :]
            e = np.exp(logits)
            a[b] = e / e.sum(axis=1, keepdims=True)
    return a


def ref_global_channel(layer, f, transposed=False):
    a = ref_global_channel_map(layer, f, transposed)
    g = np.einsum("bhwi,bij->bhwj", f, a)  # G_c[p, j] = sum_i V[p, i] a[i, j]
    return a, f * g                         # eq. 5, no residual


def ref_global_spatial(layer, f, target=None, transposed=False, logit_scale=None):
    """a[b, m, n] softmax over keys m of s K_m . Q_n (s = 1, or 1/sqrt(c') for logit
    scale "sqrt"; default: the layer's own); G_s = conv1x1(sum_m a[m, n] V_m); eq. 6
    output."""
    b_, h, w, _ = f.shape
    cp = layer.reduced_channels
    logit_scale = layer.logit_scale if logit_scale is None else logit_scale
    s = 1.0 / np.sqrt(cp) if logit_scale == "sqrt" else 1.0
    q = np_conv2d(f, *kb(layer.conv_query)).reshape(b_, h * w, cp)
    k = np_conv2d(f, *kb(layer.conv_key)).reshape(b_, h * w, cp)
    v = np_conv2d(f, *kb(layer.conv_value)).reshape(b_, h * w, cp)
    a = np.zeros((b_, h * w, h * w))
    o = np.zeros((b_, h * w, cp))
    for b in range(b_):
        for n in range(h * w):
            logits = np.array([k[b, m] @ q[b, n] for m in range(h * w)])
            if transposed:  # wrong: the key position fixed, softmax over queries
                logits = np.array([k[b, n] @ q[b, m] for m in range(h * w)])
            logits = s * logits
            e = np.exp(logits - logits.max())
            a[b, :, n] = e / e.sum()
            o[b, n] = sum(a[b, m, n] * v[b, m] for m in range(h * w))
    g = np_conv2d(o.reshape(b_, h, w, cp), *kb(layer.conv_out))
    target = f if target is None else target
    return a, target * g + target


def ref_glam(module, f):
    """Full module per variant (spec 'Ablation variants' + 'Fusion')."""
    branches = []
    if module.has_local:
        x = f
        if module.local_channel is not None:
            x = ref_local_channel(module.local_channel, f)[1]
        if module.local_spatial is not None:
            a = ref_local_spatial_map(module.local_spatial, f)  # map from F
            x = x * a + x
        branches.append(x)
    if module.has_global:
        x = f
        if module.global_channel is not None:
            x = ref_global_channel(module.global_channel, f)[1]
        if module.global_spatial is not None:
            x = ref_global_spatial(module.global_spatial, f, target=x)[1]  # G_s from F
        branches.append(x)
    # The weight holds beta' = beta / fusion_lr_multiplier.
    beta = module.fusion_lr_multiplier * np.asarray(module.fusion_beta, np.float64)
    wts = np.exp(beta) / np.exp(beta).sum()
    return sum(wi * x for wi, x in zip(wts, branches)) + wts[-1] * f


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def seeded():
    """Deterministic Keras initialisers (the assertions hold for any init; this keeps
    failures reproducible)."""
    keras.utils.set_random_seed(0)


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, H, W, C)).astype("float32")


def randomize_biases(layer, seed=1, scale=0.3):
    """Biases start at zero; make them random so the references check them too."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        if v.path.endswith("bias"):
            v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))


def assert_close(actual, expected, tol=TOL):
    err = np.max(np.abs(np.asarray(actual, np.float64) - expected))
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("layer_cls,kwargs", [
    (LocalChannelAttention, {"kernel_size": 3}),
    (LocalSpatialAttention, {"reduced_channels": CP, "dilations": (1, 2, 3)}),
    (GlobalChannelAttention, {"kernel_size": 3}),
    (GlobalSpatialAttention, {"reduced_channels": CP}),
    (GlobalSpatialAttention, {"reduced_channels": CP, "logit_scale": "sqrt"}),
    *[(GlamModule, {"variant": v, "reduced_channels": CP, "kernel_size": 3})
      for v in MODULE_VARIANTS],
    (GlamModule, {"variant": "global+local", "reduced_channels": CP,
                  "zero_init_attention": True}),
    (GlamModule, {"variant": "global+local", "reduced_channels": CP,
                  "fusion_identity_weight": 0.8, "fusion_lr_multiplier": 10.0,
                  "global_spatial_logit_scale": "sqrt", "local_spatial_activation": "sigmoid"}),
    (LocalSpatialAttention, {"reduced_channels": CP, "activation": "sigmoid"}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(map(str, v.values())))
def test_layer_basics(feats, layer_cls, kwargs):
    """Shapes, config and .keras round trips (same outputs), float32 and mixed_bfloat16."""
    run_layer_test(layer_cls, kwargs, feats, expected_output_shape=(B, H, W, C))


def test_local_channel_attention_matches_numpy(feats):
    layer = LocalChannelAttention(kernel_size=3, name="lc")
    layer.build(feats.shape)
    layer.conv.kernel.assign(np.array([[[0.7]], [[-1.2]], [[0.9]]], "float32"))
    randomize_biases(layer)
    out, a = layer(feats, return_attention=True)
    a_ref, out_ref = ref_local_channel(layer, feats)
    assert a.shape == (B, 1, 1, C)
    assert_close(a, a_ref)
    assert_close(out, out_ref)
    assert_close(layer(feats), out_ref)
    assert layer.conv.name == "lc_conv"


def test_local_spatial_attention_matches_numpy(feats):
    layer = LocalSpatialAttention(reduced_channels=CP, dilations=(1, 2, 3), name="ls")
    layer.build(feats.shape)
    randomize_biases(layer)
    out, a = layer(feats, return_attention=True)
    a_ref = ref_local_spatial_map(layer, feats)
    assert a.shape == (B, H, W, 1)
    assert_close(a, a_ref)
    assert_close(out, feats * a_ref + feats)  # F * A_s^l + F
    # Applied to another target (eq. 2 applies it to F_c^l), the map still comes from F.
    target = np.random.default_rng(5).normal(size=feats.shape).astype("float32")
    assert_close(layer(feats, target=target), target * a_ref + target)
    # The map is linear in F (no activation anywhere, spec step 4): it takes negative values.
    assert float(np.min(a)) < 0 < float(np.max(a))
    assert [c.name for c in layer.dilated_convs] == ["ls_conv_d1", "ls_conv_d2", "ls_conv_d3"]
    assert [c.dilation_rate for c in layer.dilated_convs] == [(1, 1), (2, 2), (3, 3)]


def test_local_spatial_sigmoid_activation_bounds_the_map(feats):
    """activation "sigmoid": A = sigmoid(the spec's map), so each position of the target is
    kept at 1x to 2x (never sign-flipped); the same weights give the spec's map without."""
    layer = LocalSpatialAttention(reduced_channels=CP, activation="sigmoid", name="ls")
    layer.build(feats.shape)
    randomize_biases(layer)
    out, a = layer(feats, return_attention=True)
    linear = ref_local_spatial_map(layer, feats)
    assert float(np.min(linear)) < 0 < float(np.max(linear))
    assert_close(a, sigmoid(linear))
    assert_close(out, feats * sigmoid(linear) + feats)
    assert 0.0 < float(np.min(a)) and float(np.max(a)) < 1.0
    assert LocalSpatialAttention.from_config(layer.get_config()).activation == "sigmoid"
    with pytest.raises(ValueError, match=r"`activation` must be one of \('none', 'sigmoid'\); "
                                         r"received activation='relu'"):
        LocalSpatialAttention(reduced_channels=CP, activation="relu")


def test_local_spatial_dilations_are_not_interchangeable(feats):
    """Dilation 3 vs 1 gives a different map (the reference's dilated conv is exercised)."""
    layer = LocalSpatialAttention(reduced_channels=CP, dilations=(1, 2, 3))
    layer.build(feats.shape)
    fp = np_conv2d(feats, *kb(layer.conv_reduce))
    k, b = kb(layer.dilated_convs[2])
    d3 = np.asarray(layer.dilated_convs[2](fp.astype("float32")))
    assert_close(d3, np_conv2d(fp, k, b, dilation=3))
    assert np.max(np.abs(d3 - np_conv2d(fp, k, b, dilation=1))) > 1e-2


def test_global_channel_attention_matches_numpy_and_softmax_runs_over_keys(feats):
    layer = GlobalChannelAttention(kernel_size=3, name="gc")
    layer.build(feats.shape)
    # Large kernels spread q and kappa over (0, 1) so both softmax directions differ a lot.
    layer.conv_query.kernel.assign(np.array([[[4.0]], [[-6.0]], [[5.0]]], "float32"))
    layer.conv_key.kernel.assign(np.array([[[-5.0]], [[7.0]], [[3.0]]], "float32"))
    randomize_biases(layer, scale=1.0)
    f = feats * 3.0  # larger channel means -> wider logits
    out, a = layer(f, return_attention=True)
    a_ref, out_ref = ref_global_channel(layer, f)
    assert a.shape == (B, C, C)
    assert_close(a, a_ref)
    assert_close(out, out_ref)
    a = np.asarray(a)
    # Columns sum to 1 over the key index i (axis 1); rows do not.
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(a.sum(axis=2) - 1.0)) > 0.05
    # The transposed softmax (over the query index) is far from the layer's output.
    a_t, out_t = ref_global_channel(layer, f, transposed=True)
    assert np.max(np.abs(a - a_t)) > 0.3 / C  # 30% of a uniform weight 1/C
    assert np.max(np.abs(np.asarray(out) - out_t)) > 0.1
    # Query and key are two separate convs (one public version reuses the query conv).
    assert layer.conv_query is not layer.conv_key
    assert [layer.conv_query.name, layer.conv_key.name] == ["gc_conv_query", "gc_conv_key"]


@pytest.mark.parametrize("bias", [0.0, 12.0])
def test_global_channel_series_matches_explicit_softmax_at_full_width(bias):
    """call() uses a power series of exp(kappa_i q_j); at C = 2048 it equals the explicit
    softmax (float64 NumPy), including the worst case of the truncation, q and kappa -> 1
    (bias 12: sigmoid = 0.999994), and on channel means of mixed sign."""
    rng = np.random.default_rng(3)
    c = 2048
    f = (rng.normal(size=(2, 2, 3, c)) * 2.0 + rng.normal(size=(1, 1, 1, c))).astype("float32")
    layer = GlobalChannelAttention(kernel_size=3)
    layer.build(f.shape)
    layer.conv_query.kernel.assign(np.array([[[1.5]], [[-2.0]], [[3.0]]], "float32"))
    layer.conv_key.kernel.assign(np.array([[[-2.5]], [[2.0]], [[1.0]]], "float32"))
    layer.conv_query.bias.assign([bias])
    layer.conv_key.bias.assign([bias])
    s = f.astype(np.float64).mean(axis=(1, 2))
    q = sigmoid(np_conv1d_channels(s, *kb(layer.conv_query)))
    kappa = sigmoid(np_conv1d_channels(s, *kb(layer.conv_key)))
    e = np.exp(kappa[:, :, None] * q[:, None, :])               # [b, i, j]
    a = e / e.sum(axis=1, keepdims=True)
    expected = f * np.einsum("bhwi,bij->bhwj", f.astype(np.float64), a)
    out = np.asarray(layer(f), np.float64)
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(out - expected)) < 2e-6 * scale
    a_layer = np.asarray(layer.attention(f), np.float64)
    assert np.max(np.abs(a_layer - a)) < 1e-8


def test_global_channel_gradients_stay_finite_when_sigmoids_saturate(feats):
    """q = kappa = 0 exactly (bias -200): a = uniform, G_c = channel mean; every gradient
    finite (the powers kappa^n are products, not pow(kappa, 0))."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    layer = GlobalChannelAttention(kernel_size=3)
    layer.build(feats.shape)
    layer.conv_query.bias.assign([-200.0])
    layer.conv_key.bias.assign([-200.0])
    x = tf.constant(feats)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
        loss = tf.reduce_sum(tf.square(out))
    assert_close(out, feats * feats.mean(axis=-1, keepdims=True))
    for grad in tape.gradient(loss, [x] + layer.trainable_variables):
        assert np.all(np.isfinite(np.asarray(grad)))


def test_global_spatial_attention_matches_numpy_and_softmax_runs_over_keys(feats):
    layer = GlobalSpatialAttention(reduced_channels=CP, name="gs")
    layer.build(feats.shape)
    randomize_biases(layer)
    out, a = layer(feats, return_attention=True)
    a_ref, out_ref = ref_global_spatial(layer, feats)
    assert a.shape == (B, H * W, H * W)
    assert_close(a, a_ref)
    assert_close(out, out_ref)
    a = np.asarray(a)
    # For each query position n, the weights over key positions m (axis 1) sum to 1.
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(a.sum(axis=2) - 1.0)) > 0.1
    a_t, out_t = ref_global_spatial(layer, feats, transposed=True)
    assert np.max(np.abs(a - a_t)) > 0.1
    assert np.max(np.abs(np.asarray(out) - out_t)) > 0.1
    target = np.random.default_rng(6).normal(size=feats.shape).astype("float32")
    assert_close(layer(feats, target=target), ref_global_spatial(layer, feats, target)[1])


def test_global_spatial_has_no_1_over_sqrt_c_scaling(feats):
    """Scaling Q by s scales the logits by s exactly: a = softmax(K.Q), not K.Q/sqrt(c')."""
    layer = GlobalSpatialAttention(reduced_channels=CP)
    layer.build(feats.shape)
    a = np.asarray(layer.attention(feats))
    k = np_conv2d(feats, *kb(layer.conv_key)).reshape(B, H * W, CP)
    q = np_conv2d(feats, *kb(layer.conv_query)).reshape(B, H * W, CP)
    logits = np.einsum("bmc,bnc->bmn", k, q)
    scaled = logits / np.sqrt(CP)
    ref_scaled = np.exp(scaled - scaled.max(1, keepdims=True))
    ref_scaled /= ref_scaled.sum(1, keepdims=True)
    assert np.max(np.abs(a - ref_scaled)) > 1e-2


def test_global_spatial_sqrt_logit_scale_matches_numpy(feats):
    """logit_scale "sqrt": a = softmax(K.Q / sqrt(c')) over keys, in attention(), in the
    return_attention path and in the output; it differs from the unscaled map."""
    layer = GlobalSpatialAttention(reduced_channels=CP, logit_scale="sqrt", name="gs")
    layer.build(feats.shape)
    randomize_biases(layer)
    a_ref, out_ref = ref_global_spatial(layer, feats)
    out, a = layer(feats, return_attention=True)
    assert_close(a, a_ref)
    assert_close(layer.attention(feats), a_ref)
    assert_close(out, out_ref)
    assert_close(layer(feats), out_ref)
    a_plain, out_plain = ref_global_spatial(layer, feats, logit_scale="none")
    assert np.max(np.abs(np.asarray(a) - a_plain)) > 1e-2
    assert np.max(np.abs(np.asarray(out) - out_plain)) > 1e-2
    # The unscaled layer with the same weights gives the unscaled map.
    plain = GlobalSpatialAttention(reduced_channels=CP)
    plain.build(feats.shape)
    plain.set_weights(layer.get_weights())
    assert_close(plain.attention(feats), a_plain)


@pytest.mark.parametrize("variant,w0,m,expected", [
    ("global+local", 0.8, 1.0, [0.1, 0.1, 0.8]),
    ("global+local", 0.8, 10.0, [0.1, 0.1, 0.8]),
    ("local", 0.8, 100.0, [0.2, 0.8]),
    ("global-channel", 0.5, 1.0, [0.5, 0.5]),
    ("global+local", 0.0, 10.0, [1 / 3, 1 / 3, 1 / 3]),
])
def test_fusion_identity_weight_and_lr_multiplier_set_the_initial_fusion(feats, variant, w0,
                                                                        m, expected):
    """softmax(beta) at init gives F the requested weight and the branches equal shares;
    the weight stores beta' = beta / m (beta_F = log(w0) - log((1 - w0) / n)); the output
    is the NumPy fusion with beta = m * beta'."""
    module = GlamModule(variant, reduced_channels=CP, fusion_identity_weight=w0,
                        fusion_lr_multiplier=m)
    module.build(feats.shape)
    n = module.num_branches
    beta = np.zeros(n + 1)
    if w0:
        beta[-1] = np.log(w0) - np.log((1 - w0) / n)
    np.testing.assert_allclose(np.exp(beta) / np.exp(beta).sum(), expected, atol=1e-12)
    np.testing.assert_allclose(np.asarray(module.fusion_beta), beta / m, rtol=1e-6,
                               atol=1e-7)
    weights = module.fusion_weights()
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    np.testing.assert_allclose(np.asarray(weights), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(module.fusion_logits()), beta, atol=1e-5)
    assert_close(module(feats), ref_glam(module, feats))
    module.fusion_beta.assign(np.linspace(-0.3, 0.2, n + 1).astype("float32"))
    assert_close(module(feats), ref_glam(module, feats))


def test_fusion_lr_multiplier_speeds_up_beta_under_adam(feats):
    """One Adam step moves beta' by ~lr (sign of the gradient), so beta = m beta' moves
    by ~m lr: the moves at m = 10 are 10x those at m = 1 (same weights, same gradient
    direction)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    lr = 1e-2
    target = np.random.default_rng(7).normal(size=feats.shape).astype("float32")
    moves = {}
    for m in (1.0, 10.0):
        keras.utils.set_random_seed(0)  # same sublayer weights for both
        module = GlamModule("global+local", reduced_channels=CP, fusion_identity_weight=0.8,
                            fusion_lr_multiplier=m)
        module.build(feats.shape)
        before = np.asarray(module.fusion_logits(), np.float64)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(module(feats) * target)
        grad = tape.gradient(loss, module.fusion_beta)
        assert np.min(np.abs(np.asarray(grad))) > 0.1  # Adam's eps (~3e-6 at step 1) negligible
        keras.optimizers.Adam(learning_rate=lr).apply_gradients([(grad, module.fusion_beta)])
        moves[m] = np.asarray(module.fusion_logits(), np.float64) - before
    np.testing.assert_allclose(np.abs(moves[1.0]), lr, rtol=1e-3)
    np.testing.assert_allclose(moves[10.0] / moves[1.0], 10.0, rtol=1e-3)


def test_glam_module_config_keeps_the_new_args_and_reads_old_configs(feats):
    module = GlamModule("global+local", reduced_channels=CP, fusion_identity_weight=0.7,
                        fusion_lr_multiplier=20.0, global_spatial_logit_scale="sqrt",
                        local_spatial_activation="sigmoid")
    config = module.get_config()
    clone = GlamModule.from_config(config)
    assert (clone.fusion_identity_weight, clone.fusion_lr_multiplier,
            clone.global_spatial_logit_scale,
            clone.local_spatial_activation) == (0.7, 20.0, "sqrt", "sigmoid")
    assert clone.global_spatial.logit_scale == "sqrt"
    assert clone.local_spatial.activation == "sigmoid"
    # A config saved before these settings existed loads with today's defaults.
    for key in ("fusion_identity_weight", "fusion_lr_multiplier",
                "global_spatial_logit_scale", "local_spatial_activation"):
        del config[key]
    old = GlamModule.from_config(config)
    assert (old.fusion_identity_weight, old.fusion_lr_multiplier,
            old.global_spatial_logit_scale,
            old.local_spatial_activation) == (0.0, 1.0, "none", "none")
    ls_config = old.local_spatial.get_config()
    del ls_config["activation"]
    assert LocalSpatialAttention.from_config(ls_config).activation == "none"
    gs_config = old.global_spatial.get_config()
    del gs_config["logit_scale"]
    assert GlobalSpatialAttention.from_config(gs_config).logit_scale == "none"
    old.build(feats.shape)
    np.testing.assert_allclose(np.asarray(old.fusion_weights()), 1 / 3, atol=1e-7)


@pytest.mark.parametrize("variant", MODULE_VARIANTS)
def test_glam_module_variant_matches_numpy(feats, variant):
    module = GlamModule(variant, reduced_channels=CP, kernel_size=3, name="glam")
    module.build(feats.shape)
    n = module.num_branches
    assert n == (2 if variant == "global+local" else 1)
    # The fusion softmax runs over the present branches plus F and starts equal.
    np.testing.assert_allclose(np.asarray(module.fusion_weights()), 1.0 / (n + 1), atol=1e-7)
    assert module.fusion_beta.shape == (n + 1,)
    present = {k for k in ("local_channel", "local_spatial", "global_channel",
                           "global_spatial") if getattr(module, k) is not None}
    expected = {
        "local-channel": {"local_channel"}, "local-spatial": {"local_spatial"},
        "local": {"local_channel", "local_spatial"},
        "global-channel": {"global_channel"}, "global-spatial": {"global_spatial"},
        "global": {"global_channel", "global_spatial"},
        "global+local": {"local_channel", "local_spatial", "global_channel",
                         "global_spatial"},
    }[variant]
    assert present == expected
    randomize_biases(module)
    if module.global_channel is not None:
        module.global_channel.conv_query.kernel.assign(
            np.array([[[2.0]], [[-3.0]], [[2.5]]], "float32"))
    assert_close(module(feats), ref_glam(module, feats))  # equal weights
    rng = np.random.default_rng(3)
    module.fusion_beta.assign(rng.normal(size=(n + 1,)).astype("float32"))
    out, maps = module(feats, return_attention=True)
    assert_close(out, ref_glam(module, feats))
    assert set(maps) >= present


def test_glam_fusion_weights_follow_beta(feats):
    """F^gl = w_l F^l + w_g F^g + w F with (w_l, w_g, w) = softmax(beta): a huge beta on one
    term selects it."""
    module = GlamModule("global+local", reduced_channels=CP)
    module.build(feats.shape)
    _, maps = module(feats, return_attention=True)
    for idx, expected in ((0, maps["local"]), (1, maps["global"]), (2, feats)):
        beta = np.full((3,), -50.0, "float32")
        beta[idx] = 50.0
        module.fusion_beta.assign(beta)
        assert_close(module(feats), np.asarray(expected))


def test_zero_init_attention_starts_spatial_blocks_as_identity_and_still_learns(feats):
    """zero_init_attention: A_s^l = 0 and G_s = 0 at init, so F^l = F_c^l and F^g = F_c^g
    exactly (eqs. 2 and 6 reduce to their residual), yet the output convs get gradients;
    the default keeps Keras' random init (non-zero maps)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    module = GlamModule("global+local", reduced_channels=CP, zero_init_attention=True)
    module.build(feats.shape)
    _, maps = module(feats, return_attention=True)
    assert np.all(np.asarray(maps["local_spatial"]) == 0.0)
    np.testing.assert_array_equal(np.asarray(maps["local"]),
                                  np.asarray(module.local_channel(feats)))
    np.testing.assert_array_equal(np.asarray(maps["global"]),
                                  np.asarray(module.global_channel(feats)))
    outs = [module.local_spatial.conv_out.kernel, module.global_spatial.conv_out.kernel]
    x = tf.constant(feats)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(module(x)))
    for grad in tape.gradient(loss, outs):
        assert float(tf.reduce_max(tf.abs(grad))) > 1e-3
    clone = GlamModule.from_config(module.get_config())
    assert clone.zero_init_attention and clone.local_spatial.zero_init_output
    assert clone.global_spatial.zero_init_output
    default = GlamModule("global+local", reduced_channels=CP)
    default.build(feats.shape)
    _, maps = default(feats, return_attention=True)
    assert np.max(np.abs(np.asarray(maps["local_spatial"]))) > 1e-2


def test_glam_sublayer_names_are_stable(feats):
    module = GlamModule("global+local", reduced_channels=CP, name="glam")
    module.build(feats.shape)
    paths = {v.path for v in module.weights}
    for p in ("glam/fusion_beta",
              "glam/glam_local_channel/glam_local_channel_conv/kernel",
              "glam/glam_local_spatial/glam_local_spatial_conv_d2/kernel",
              "glam/glam_local_spatial/glam_local_spatial_conv_1x1/kernel",
              "glam/glam_global_channel/glam_global_channel_conv_key/kernel",
              "glam/glam_global_spatial/glam_global_spatial_conv_value/kernel"):
        assert p in paths, sorted(paths)


def glam_closed_form_params(c, cp, k=3, n_dilations=3):
    """Parameter count of the global+local module, biases included.

    local channel   : conv1d k taps + 1 bias                         = k + 1
    local spatial   : 1x1 c->c'            c*c' + c'
                      n_dil x 3x3 c'->c'   n_dil * (9*c'^2 + c')
                      1x1 c'->c'           c'^2 + c'
                      1x1 (n_dil+1)c'->1   (n_dil+1)*c' + 1
    global channel  : two conv1d (query, key)                         = 2 (k + 1)
    global spatial  : query 1x1 c->c'      c*c' + c'
                      key 1x1 c->c'        c*c'   (no bias: the softmax over keys cancels it)
                      value 1x1 c->c'      c*c' + c'
                      out 1x1 c'->c        c'*c + c
    fusion          : beta, 3 scalars
    """
    local_channel = k + 1
    local_spatial = ((c * cp + cp) + n_dilations * (9 * cp * cp + cp) + (cp * cp + cp)
                     + ((n_dilations + 1) * cp + 1))
    global_channel = 2 * (k + 1)
    global_spatial = (c * cp + cp) + c * cp + (c * cp + cp) + (cp * c + c)
    return local_channel + local_spatial + global_channel + global_spatial + 3


@pytest.mark.parametrize("cp,spec_millions", [(128, 1.76), (256, 4.4), (512, 12.3)])
def test_glam_param_count_matches_closed_form(cp, spec_millions):
    module = GlamModule("global+local", reduced_channels=cp)
    out = module(np.zeros((1, 7, 7, 2048), "float32"))
    assert out.shape == (1, 7, 7, 2048)
    count = module.count_params()
    closed = glam_closed_form_params(2048, cp)
    print(f"GLAM module params at c=2048, c'={cp}: {count:,} (closed form {closed:,}; "
          f"spec says about {spec_millions}M)")
    assert count == closed
    # The spec's rounded figures match within 3% (they leave out the c'->c' 1x1 branch of
    # the local spatial concat, c'^2 + c' parameters; see the test's report).
    assert abs(count / 1e6 - spec_millions) / spec_millions < 0.03


@pytest.mark.parametrize("layer_cls,kwargs,match", [
    (LocalChannelAttention, {"kernel_size": 2}, "kernel_size"),
    (GlobalChannelAttention, {"kernel_size": 0}, "kernel_size"),
    (LocalSpatialAttention, {"reduced_channels": 0}, "reduced_channels"),
    (LocalSpatialAttention, {"dilations": ()}, "dilations"),
    (LocalSpatialAttention, {"dilations": (1, 1)}, "dilations"),
    (GlobalSpatialAttention, {"reduced_channels": 2.5}, "reduced_channels"),
    (GlobalSpatialAttention, {"logit_scale": "rsqrt"}, "logit_scale"),
    (GlamModule, {"fusion_identity_weight": 1.0}, "fusion_identity_weight"),
    (GlamModule, {"fusion_identity_weight": -0.1}, "fusion_identity_weight"),
    (GlamModule, {"fusion_lr_multiplier": 0.0}, "fusion_lr_multiplier"),
    (GlamModule, {"fusion_lr_multiplier": float("inf")}, "fusion_lr_multiplier"),
    (GlamModule, {"variant": "local", "global_spatial_logit_scale": "x"},
     "global_spatial_logit_scale"),
    (GlamModule, {"variant": "baseline"}, "no GLAM module"),
    (GlamModule, {"variant": "glam"}, "variant"),
])
def test_bad_layer_arguments_raise_clear_errors(layer_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_cls(**kwargs)


def test_layers_reject_unknown_channel_count():
    with pytest.raises(ValueError, match="known C"):
        LocalChannelAttention().build((None, None, None, None))


@pytest.mark.parametrize("layer", [
    LocalChannelAttention(), LocalSpatialAttention(reduced_channels=CP),
    GlobalChannelAttention(), GlobalSpatialAttention(reduced_channels=CP),
    GlamModule("global+local", reduced_channels=CP)],
    ids=lambda l: type(l).__name__)
def test_symbolic_shapes_with_unknown_batch_and_size(layer):
    x = keras.Input((None, None, C))
    y = layer(x)
    assert tuple(y.shape) == (None, None, None, C)
    assert tuple(layer.compute_output_shape((None, None, None, C))) == (None, None, None, C)
