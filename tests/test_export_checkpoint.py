"""export_from_checkpoint / export_main: rebuild from model_config.json, restore the latest
checkpoint, export; clear errors for missing or mismatched inputs and bad flags."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import export_main
from glam_tf.config import ExportConfig, SettingError
from glam_tf.export import export_from_checkpoint
from glam_tf.model import ModelConfig, build_descriptor_model

# The training run's config: weights "imagenet" as training writes it; export must rebuild
# with weights "none" (no download, the checkpoint holds every weight).
CONFIG = ModelConfig(backbone="resnet50", weights="imagenet", reduced_channels=16)


def _perturb(model, seed):
    """Moves the (non-zero) variables off their initial values, as training would.

    Multiplicative, so activations keep their scale (additive noise on every conv kernel
    and BN parameter makes a 50-layer random network overflow to NaN).
    """
    rng = np.random.RandomState(seed)
    for v in model.variables:
        noise = rng.uniform(0.9, 1.1, v.shape).astype(np.float32)
        v.assign(v.numpy() * noise)


def _write_train_dir(root, config, model, *, saves=1):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_config.json").write_text(json.dumps(config.to_dict()))
    # Extra objects stand in for the optimizer and step counter: ignored (expect_partial).
    ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(3, dtype=tf.int64),
                               optimizer_slots=tf.Variable(tf.zeros([4])))
    manager = tf.train.CheckpointManager(ckpt, str(root / "checkpoints"), max_to_keep=3)
    for i in range(saves):
        _perturb(model, seed=i)
        manager.save()
    return manager.latest_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(train_dir, model at the latest checkpoint's weights, latest prefix)."""
    keras.utils.set_random_seed(1)
    model = build_descriptor_model(dataclasses.replace(CONFIG, weights="none"))
    train_dir = tmp_path_factory.mktemp("run") / "train"
    latest = _write_train_dir(train_dir, CONFIG, model, saves=2)
    return train_dir, model, latest


def export_flags(*args) -> flags.FlagValues:
    """export_main's flags parsed from args, in a FlagValues of their own (not absl's FLAGS)."""
    flag_values = flags.FlagValues()
    export_main.define_flags(flag_values)
    flag_values(["export_main", *args])
    return flag_values


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    train_dir, _, _ = trained
    export_dir = tmp_path_factory.mktemp("exports") / "glam"
    return export_main.run_export(export_flags(
        f"--train_dir={train_dir}", f"--export_dir={export_dir}", "--scales=0.75,1.0,1.25",
        "--max_image_size=96", "--max_decoded_pixels=50000000", "--max_image_bytes=1000000",
        "--max_batch_pixels=40000000"))


def test_export_main_restores_the_latest_checkpoint(trained, exported):
    _, model, latest = trained
    assert exported.endswith(os.path.join("glam", "1"))
    info = json.loads(open(os.path.join(exported, "assets.extra", "glam_export.json")).read())
    assert info["checkpoint"] == os.path.abspath(latest) and latest.endswith("ckpt-2")
    assert info["model_config"] == dataclasses.replace(CONFIG, weights="none").to_dict()
    assert info["scales"] == [0.75, 1.0, 1.25] and info["max_image_size"] == 96
    assert (info["max_decoded_pixels"], info["max_image_bytes"], info["max_batch_pixels"]) == (
        50000000, 1000000, 40000000)

    # Every weight in the SavedModel is the trained (perturbed, latest-checkpoint) value; a
    # missed restore would leave the initial values. Descriptor equality of an export with
    # its Keras model is tested in test_export_serving.py.
    reader = tf.train.load_checkpoint(os.path.join(exported, "variables", "variables"))
    for i, variable in enumerate(model.variables):
        saved = reader.get_tensor(f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(saved, variable.numpy(), err_msg=variable.path)
    assert not reader.has_tensor(f"model_variables/{len(model.variables)}/.ATTRIBUTES/"
                                 "VARIABLE_VALUE")


def test_missing_train_dir_config_and_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        export_from_checkpoint(tmp_path / "nope", tmp_path / "out")
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
        export_from_checkpoint(train_dir, tmp_path / "out")
    (train_dir / "model_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_config.json is not valid JSON"):
        export_from_checkpoint(train_dir, tmp_path / "out")
    (train_dir / "model_config.json").write_text(json.dumps({"variant": "nope"}))
    with pytest.raises(ValueError, match="not hold a valid ModelConfig.*variant"):
        export_from_checkpoint(train_dir, tmp_path / "out")
    (train_dir / "model_config.json").write_text(json.dumps(CONFIG.to_dict()))
    with pytest.raises(FileNotFoundError, match="checkpoints does not exist"):
        export_from_checkpoint(train_dir, tmp_path / "out")
    (train_dir / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        export_from_checkpoint(train_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    baseline = dataclasses.replace(CONFIG, weights="none", variant="baseline")
    train_dir = tmp_path / "train"
    _write_train_dir(train_dir, baseline, build_descriptor_model(baseline))
    # The config claims GLAM, the checkpoint holds a baseline model: no "glam" weights.
    (train_dir / "model_config.json").write_text(json.dumps(CONFIG.to_dict()))
    with pytest.raises(ValueError, match="does not hold every weight"):
        export_from_checkpoint(train_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_main_validates_flags_before_any_work(trained, tmp_path):
    train_dir, _, _ = trained
    (tmp_path / "e" / "2").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    cases = [
        ([f"--export_dir={tmp_path}"], "--train_dir is required"),
        ([f"--train_dir={train_dir}"], "--export_dir is required"),
        ([f"--train_dir={tmp_path / 'nope'}", f"--export_dir={tmp_path}"], "not a directory"),
        ([f"--train_dir={train_dir}", f"--export_dir={tmp_path / 'file'}"],
         "exists and is not a directory"),
    ]
    both = [f"--train_dir={train_dir}", f"--export_dir={tmp_path}"]
    cases += [(both + [flag], match) for flag, match in (
        ("--scales=a,b", "--scales must be a comma-separated list"),
        ("--scales=1,-1", "--scales must be a non-empty list of finite numbers > 0"),
        ("--max_image_size=0", "--max_image_size must be an integer >= 32"),
        ("--max_decoded_pixels=0", "--max_decoded_pixels must be a positive integer"),
        ("--max_image_bytes=0", "--max_image_bytes must be an integer in"),
        ("--max_batch_pixels=1000", "--max_batch_pixels must be >= max_scaled_pixels"))]
    both = [f"--train_dir={train_dir}", f"--export_dir={tmp_path / 'e'}"]
    cases += [(both + ["--version=-1"], "non-negative integer"),
              (both + ["--version=2"], "already exists")]
    for args, match in cases:
        with pytest.raises(SettingError, match=match):
            export_main.parse_flags(export_flags(*args))
    assert export_main.parse_flags(export_flags(
        f"--train_dir={train_dir}", f"--export_dir={tmp_path / 'e'}")) == dict(
        train_dir=str(train_dir), export_dir=str(tmp_path / "e"), version=3,
        config=ExportConfig())


def test_export_main_program_reports_usage_errors(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "export_main.py"), f"--export_dir={tmp_path}"],
        cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "export_main: error: --train_dir is required."
    assert not os.listdir(tmp_path)


def test_latest_checkpoint_is_the_newest_that_restores(tmp_path, caplog):
    """Without a state file, with the newest checkpoint's data truncated: export and
    evaluation (--train_dir) read the newest checkpoint whose tensors all read back."""
    from glam_tf.config.contract import latest_checkpoint  # noqa: PLC0415

    folder = tmp_path / "checkpoints"
    variable = tf.Variable(np.arange(100, dtype=np.float32))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(folder),
                                         max_to_keep=5, checkpoint_name="ckpt")
    for step in (3, 6):
        variable.assign_add(np.ones(100, np.float32))
        manager.save(checkpoint_number=step)
    (folder / "checkpoint").unlink()
    assert latest_checkpoint(tmp_path) == str(folder / "ckpt-6")
    [data] = folder.glob("ckpt-6.data-*")
    data.write_bytes(data.read_bytes()[:-10])
    caplog.set_level("WARNING")
    assert latest_checkpoint(tmp_path) == str(folder / "ckpt-3")
    assert f"Checkpoint {folder / 'ckpt-6'} is damaged (OutOfRangeError" in caplog.text
    assert data.exists()  # a reader leaves it in place
    for index in folder.glob("ckpt-3.*"):
        index.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .* restores: damaged "
                                                r"ckpt-6 \(.*\), ckpt-3 \("):
        latest_checkpoint(tmp_path)
