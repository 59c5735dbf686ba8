"""SavedModel signatures vs the Keras model (NumPy/eager reference), edge inputs, loading
without glam_tf (subprocess) and with saved_model_cli.

One ResNet50 (weights none) GLAM model is exported once for the module (max_image_size 128).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from glam_tf.config import contract
from glam_tf.export import serving
from glam_tf.model import ModelConfig, build_descriptor_model

MAX_SIZE = 128
SCALES = contract.DEFAULT_SCALES
TOL = 1e-5


# ---- NumPy / eager reference ---------------------------------------------------------------
def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rgb_float(image):
    x = np.asarray(image, np.float32)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def ref_scale_descriptors(model, image, scales):
    """(S, D): per scale, bilinear resize to round([H, W] * s) (float32 math) and the model."""
    x = _rgb_float(image)
    rows = []
    for s in scales:
        size = [int(np.round(np.float32(n) * np.float32(s))) for n in x.shape[:2]]
        resized = tf.image.resize(x[None], size, method="bilinear")
        rows.append(model(resized, training=False).numpy()[0])
    return np.stack(rows)


def ref_multiscale(model, image, scales=SCALES):
    """Mean of the per-scale unit descriptors, L2-normalised (GLAM_SPEC "Inference")."""
    return _l2n(ref_scale_descriptors(model, image, scales).mean(axis=0))


def ref_global_descriptor(model, image, max_size=MAX_SIZE, scales=SCALES):
    """Longer side to max_size (antialiased bilinear), then ref_multiscale."""
    x = _rgb_float(image)
    factor = np.float32(max_size) / np.float32(max(x.shape[:2]))
    size = [max(1, int(np.round(np.float32(n) * factor))) for n in x.shape[:2]]
    x = tf.image.resize(x[None], size, method="bilinear", antialias=True)[0].numpy()
    return ref_multiscale(model, x, scales)


def random_image(h, w, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, c), dtype=np.uint8)


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_descriptor_model(
        ModelConfig(backbone="resnet50", weights="none", reduced_channels=64))


@pytest.fixture(scope="module")
def export_path(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    (base / "3").mkdir()                # an older version
    (base / "latest").mkdir()           # not a version: ignored
    return serving.export_saved_model(model, base, max_image_size=MAX_SIZE)


@pytest.fixture(scope="module")
def loaded(export_path):
    return tf.saved_model.load(export_path)


def _sig(loaded, name):
    return loaded.signatures[name]


def _unit_rows(x):
    """Checks descriptors are finite unit vectors (NaN == NaN would pass assert_allclose)."""
    assert np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5)
    return x


def serving_default(loaded, image, scales, ind):
    out = _sig(loaded, "serving_default")(
        input_image=tf.constant(image), input_scales=tf.constant(scales, tf.float32),
        input_global_scales_ind=tf.constant(ind, tf.int32))
    return _unit_rows(out["global_descriptors"].numpy())


def global_descriptor(loaded, image):
    return _unit_rows(_sig(loaded, "global_descriptor")(
        input_image=tf.constant(image))["global_descriptor"].numpy())


def batched(loaded, images):
    return _unit_rows(_sig(loaded, "batched_global_descriptors")(
        input_images=tf.constant(images))["global_descriptors"].numpy())


# ---- layout and interface ------------------------------------------------------------------
def test_version_folder_and_export_info(export_path):
    path = pathlib.Path(export_path)
    assert path.name == "4"             # next after the existing "3"; "latest" ignored
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    info = json.loads((path / "assets.extra" / "glam_export.json").read_text())
    assert info["scales"] == list(SCALES) and info["max_image_size"] == MAX_SIZE
    assert info["descriptor_dim"] == 512 and info["signatures"] == list(serving.SIGNATURE_NAMES)


def test_signatures_have_typed_inputs_and_outputs(loaded):
    specs = {name: fn.structured_input_signature[1] for name, fn in loaded.signatures.items()}
    assert set(specs) == set(serving.SIGNATURE_NAMES)
    sd = specs["serving_default"]
    assert (sd["input_image"].dtype, sd["input_image"].shape.as_list()) == (tf.uint8,
                                                                            [None] * 3)
    assert (sd["input_scales"].dtype, sd["input_scales"].shape.as_list()) == (tf.float32,
                                                                              [None])
    assert sd["input_global_scales_ind"].dtype == tf.int32
    assert specs["global_descriptor"]["input_image"].dtype == tf.uint8
    assert specs["batched_global_descriptors"]["input_images"].shape.rank == 4
    assert specs["global_descriptor_from_bytes"]["image_bytes"].dtype == tf.string
    outs = {name: {k: v.shape.as_list() for k, v in fn.structured_outputs.items()}
            for name, fn in loaded.signatures.items()}
    assert outs == {
        "serving_default": {"global_descriptors": [None, 512]},
        "global_descriptor": {"global_descriptor": [512]},
        "batched_global_descriptors": {"global_descriptors": [None, 512]},
        "global_descriptor_from_bytes": {"global_descriptors": [None, 512]},
    }


# ---- values vs the Keras model ---------------------------------------------------------------
@pytest.mark.parametrize("hw", [(96, 128), (130, 70)])
def test_serving_default_matches_keras(loaded, model, hw):
    image = random_image(*hw, seed=hw[0])
    got = serving_default(loaded, image, SCALES, [0, 1, 2])
    np.testing.assert_allclose(got, ref_scale_descriptors(model, image, SCALES), atol=TOL)


def test_serving_default_selects_scales_in_index_order(loaded, model):
    image = random_image(64, 80, seed=3)
    scales = [0.75, 1.0, 1.25]
    expected = ref_scale_descriptors(model, image, [0.75, 1.25])
    # DELG's loop: each selected scale once, in the order of input_scales.
    np.testing.assert_allclose(serving_default(loaded, image, scales, [2, 0]), expected,
                               atol=TOL)
    np.testing.assert_allclose(serving_default(loaded, image, scales, [0, 2, 2]), expected,
                               atol=TOL)
    # No selected scale: refused (no row would reach a DELG client as NaN).
    with pytest.raises(tf.errors.InvalidArgumentError, match="select at least one scale"):
        serving_default(loaded, image, scales, [])


def test_delg_client_gets_the_glam_descriptor(loaded):
    # Longer side already == max_image_size: the max-size resize is the identity, so DELG's
    # client (L2 rows, sum, L2) must reproduce the global_descriptor signature.
    image = random_image(96, MAX_SIZE, seed=5)
    rows = serving_default(loaded, image, SCALES, [0, 1, 2])
    client = _l2n(_l2n(rows).sum(axis=0))
    np.testing.assert_allclose(client, global_descriptor(loaded, image), atol=TOL)


@pytest.mark.parametrize("hw", [(90, 200), (300, 240)])
def test_global_descriptor_matches_keras(loaded, model, hw):
    image = random_image(*hw, seed=hw[1])
    got = global_descriptor(loaded, image)
    assert got.shape == (512,)
    np.testing.assert_allclose(got, ref_global_descriptor(model, image), atol=TOL)


def test_batched_matches_keras_and_single_image_signature(loaded, model):
    images = np.stack([random_image(96, MAX_SIZE, seed=s) for s in range(2)])
    got = batched(loaded, images)
    assert got.shape == (2, 512)
    for i in range(2):
        np.testing.assert_allclose(got[i], ref_multiscale(model, images[i]), atol=TOL)
    # Same images through the one-image signature (no resize needed at 128 px).
    np.testing.assert_allclose(got[1], global_descriptor(loaded, images[1]), atol=TOL)


def test_from_bytes_matches_global_descriptor(loaded):
    rgb, gray = random_image(70, 150, seed=7), random_image(120, 60, c=1, seed=8)
    png = [tf.io.encode_png(rgb).numpy(), tf.io.encode_png(gray).numpy()]
    got = _unit_rows(_sig(loaded, "global_descriptor_from_bytes")(
        image_bytes=tf.constant(png))["global_descriptors"].numpy())
    assert got.shape == (2, 512)
    np.testing.assert_allclose(got[0], global_descriptor(loaded, rgb), atol=TOL)
    np.testing.assert_allclose(got[1], global_descriptor(loaded, gray), atol=TOL)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _sig(loaded, "global_descriptor_from_bytes")(image_bytes=tf.constant([b"not an image"]))


# ---- no retracing ----------------------------------------------------------------------------
def test_new_sizes_do_not_retrace(model, loaded):
    module = serving.build_serving_module(model, max_image_size=MAX_SIZE)
    fn = module.global_descriptor
    fn(random_image(50, 60))
    assert fn.experimental_get_tracing_count() == 1
    for h, w, c in [(70, 40, 3), (128, 128, 3), (100, 150, 1)]:
        fn(random_image(h, w, c))
    assert fn.experimental_get_tracing_count() == 1
    # The SavedModel holds one concrete function per signature, for every size.
    for name in serving.SIGNATURE_NAMES:
        assert len(getattr(loaded, name).concrete_functions) == 1, name
    assert global_descriptor(loaded, random_image(41, 77)).shape == (512,)


# ---- edge inputs -------------------------------------------------------------------------------
def test_small_images_raise_a_clear_error_and_the_model_keeps_serving(loaded, model):
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least 32 px"):
        serving_default(loaded, random_image(40, 40), [0.5], [0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least 32 px"):
        global_descriptor(loaded, random_image(1000, 20))   # 128 x 3 after max-size resize
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least 32 px"):
        batched(loaded, np.stack([random_image(40, 40)] * 2))   # 28 px at 1/sqrt(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="height and width >= 1"):
        global_descriptor(loaded, np.zeros((0, 10, 3), np.uint8))
    # A tiny image is still fine for global_descriptor: it is upsampled to 128 px.
    image = random_image(20, 24)
    np.testing.assert_allclose(global_descriptor(loaded, image),
                               ref_global_descriptor(model, image), atol=TOL)


def test_huge_images(loaded, model):
    big = random_image(4100, 3000, seed=11)
    np.testing.assert_allclose(global_descriptor(loaded, big),
                               ref_global_descriptor(model, big), atol=TOL)
    square = np.broadcast_to(random_image(1, 4100, seed=12), (4100, 4100, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 8388608 pixels"):
        serving_default(loaded, square, [1.0], [0])
    # Scales that bring it to a sane size work (123 x 123).
    np.testing.assert_allclose(serving_default(loaded, square, [1.0, 0.03], [1]),
                               ref_scale_descriptors(model, square, [0.03]), atol=TOL)


def test_grayscale_is_tiled_and_other_channel_counts_fail(loaded):
    gray = random_image(72, 100, c=1, seed=13)
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_allclose(serving_default(loaded, gray, [1.0], [0]),
                               serving_default(loaded, rgb, [1.0], [0]), atol=1e-6)
    np.testing.assert_allclose(global_descriptor(loaded, gray), global_descriptor(loaded, rgb),
                               atol=1e-6)
    np.testing.assert_allclose(batched(loaded, gray[None]), batched(loaded, rgb[None]),
                               atol=1e-6)
    for channels in (2, 4):
        with pytest.raises(tf.errors.InvalidArgumentError, match="1 .grayscale. or 3"):
            global_descriptor(loaded, random_image(64, 64, c=channels))


def test_bad_scales_and_indices(loaded):
    image = random_image(64, 64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must index input_scales"):
        serving_default(loaded, image, [1.0, 1.5], [2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="must index input_scales"):
        serving_default(loaded, image, [1.0], [-1])
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(tf.errors.InvalidArgumentError, match="finite and > 0"):
            serving_default(loaded, image, [1.0, bad], [0, 1])
    # An unselected bad scale is ignored (DELG clients pass local-feature scales too).
    assert serving_default(loaded, image, [1.0, -1.0], [0]).shape == (1, 512)


def test_export_arguments_are_validated_before_any_work(model, tmp_path):
    for kwargs, match in [
        (dict(scales=()), "--scales must be a non-empty list of finite numbers > 0"),
        (dict(scales=(1.0, -2.0)), "received --scales=1.0,-2.0"),
        (dict(scales=("a",)), "received --scales='a'"),
        (dict(max_image_size=0), "--max_image_size must be an integer >= 32"),
        (dict(max_image_size=40), "below the model's minimum"),
        (dict(max_image_size=4096), "over max_scaled_pixels"),
        (dict(version=-1), "non-negative integer"),
        (dict(version="2"), "non-negative integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            serving.export_saved_model(model, tmp_path / "e", **kwargs)
    (tmp_path / "e" / "5").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already exists"):
        serving.export_saved_model(model, tmp_path / "e", version=5)
    assert sorted(os.listdir(tmp_path / "e")) == ["5"]


def test_next_version(tmp_path):
    assert contract.next_version(tmp_path / "missing") == 1
    for name in ("1", "12", "7", "backup", ".tmp-13-abc"):
        (tmp_path / name).mkdir()
    (tmp_path / "99").write_text("a file, not a version")
    assert contract.next_version(tmp_path) == 13


# ---- loading without glam_tf -----------------------------------------------------------------
_CLIENT = textwrap.dedent("""
    import sys
    import numpy as np
    try:
        import glam_tf
    except ImportError:
        pass
    else:
        sys.exit("glam_tf must not be importable here; found " + glam_tf.__file__)
    import tensorflow as tf

    model = tf.saved_model.load(sys.argv[1])
    d = np.load(sys.argv[2])
    sig = model.signatures
    out = {}
    out["serving_default"] = sig["serving_default"](
        input_image=tf.constant(d["image"]), input_scales=tf.constant(d["scales"]),
        input_global_scales_ind=tf.constant(d["ind"]))["global_descriptors"].numpy()
    out["global_descriptor"] = sig["global_descriptor"](
        input_image=tf.constant(d["image"]))["global_descriptor"].numpy()
    out["from_bytes"] = sig["global_descriptor_from_bytes"](
        image_bytes=tf.constant([d["png"].tobytes()]))["global_descriptors"].numpy()
    try:
        sig["global_descriptor"](input_image=tf.zeros([4000, 10, 3], tf.uint8))
        sys.exit("a 4000x10 image should have been refused")
    except tf.errors.InvalidArgumentError as e:
        out["error"] = np.array(e.message)
    out["after_error"] = sig["global_descriptor"](
        input_image=tf.constant(d["image"]))["global_descriptor"].numpy()
    out["glam_tf_loaded"] = np.array(any(m.startswith("glam_tf") for m in sys.modules))
    np.savez(sys.argv[3], **out)
""")


def _env_without_repo():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def test_loads_and_runs_in_a_process_without_glam_tf(loaded, export_path, tmp_path):
    image = random_image(80, 110, seed=21)
    png = np.frombuffer(tf.io.encode_png(image).numpy(), np.uint8)
    np.savez(tmp_path / "in.npz", image=image, scales=np.float32([0.75, 1.0]),
             ind=np.int32([0, 1]), png=png)
    (tmp_path / "client.py").write_text(_CLIENT)
    proc = subprocess.run(
        [sys.executable, "client.py", os.path.abspath(export_path), "in.npz", "out.npz"],
        cwd=tmp_path, env=_env_without_repo(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert not out["glam_tf_loaded"]
    for key in ("serving_default", "global_descriptor", "from_bytes"):
        _unit_rows(out[key])
    np.testing.assert_allclose(out["serving_default"],
                               serving_default(loaded, image, [0.75, 1.0], [0, 1]), atol=TOL)
    expected = global_descriptor(loaded, image)
    np.testing.assert_allclose(out["global_descriptor"], expected, atol=TOL)
    np.testing.assert_allclose(out["after_error"], expected, atol=TOL)
    np.testing.assert_allclose(out["from_bytes"][0], expected, atol=TOL)
    assert "at least 32 px" in str(out["error"])


def test_saved_model_cli_run(loaded, export_path, tmp_path):
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if not cli.is_file():
        pytest.skip(f"{cli} not installed")
    image = random_image(70, 90, seed=31)
    np.save(tmp_path / "image.npy", image)
    proc = subprocess.run(
        [sys.executable, str(cli), "run", "--dir", os.path.abspath(export_path),
         "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", "input_image=image.npy",
         "--input_exprs", "input_scales=[1.0, 0.5];input_global_scales_ind=[0]",
         "--outdir", "out"],
        cwd=tmp_path, env=_env_without_repo(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out" / "global_descriptors.npy")
    np.testing.assert_allclose(got, serving_default(loaded, image, [1.0], [0]), atol=TOL)
