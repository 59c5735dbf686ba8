"""TrainConfig validation, the learning-rate schedule, every flagfile, and early CLI errors."""

import dataclasses
import glob
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from glam_tf.config import (VARIANTS, DataConfig, EvalConfig, ExportConfig, ModelConfig,
                            SettingError, SyntheticConfig, TrainConfig)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(tmp_path, **kw):
    data = kw.pop("data", DataConfig(file_pattern="", global_batch_size=8))
    base = dict(train_dir=str(tmp_path / "run"), data=data, data_source="random",
                num_classes=5, train_steps=10)
    base.update(kw)
    return TrainConfig(**base)


def test_defaults_are_the_paper_recipe():
    c = TrainConfig(train_dir="x")
    assert (c.optimizer, c.learning_rate, c.momentum, c.weight_decay) == ("sgd", 1e-3, 0.9, 1e-5)
    assert (c.end_learning_rate, c.arcface_margin, c.arcface_scale) == (3e-6, 0.3, 30.0)
    assert c.global_batch_size == 64 and c.sync_batchnorm
    assert c.model == ModelConfig()  # resnet101, imagenet, global+local, 512-d, GeM p 3


def test_export_and_evaluation_settings_are_their_configs():
    c = TrainConfig(train_dir="x")
    assert c.export_settings == ExportConfig()
    assert c.evaluation == EvalConfig()
    # the evaluation describes images at the export's scales unless --eval_scales names others
    assert c.evaluation_at(0).scales == ExportConfig().scales
    exported = TrainConfig(train_dir="x", export_settings=ExportConfig(scales=(1.0,)))
    assert exported.evaluation_at(3).scales == (1.0,)
    own = dataclasses.replace(exported, evaluation=EvalConfig(scales=(0.5, 1.0)))
    assert own.evaluation_at(3).scales == (0.5, 1.0)
    assert TrainConfig(train_dir="x", seed=7).data.seed == 7   # one seed for the run


@pytest.mark.parametrize("change,flag,rule", [
    (dict(learning_rate=0.0), "--learning_rate", "finite number > 0"),
    (dict(learning_rate=-1e-3), "--learning_rate", "finite number > 0"),
    (dict(learning_rate=float("nan")), "--learning_rate", "finite number > 0"),
    (dict(data=DataConfig(file_pattern="", global_batch_size=0)),
     "--global_batch_size", "positive integer"),
    (dict(data_source="tfrecord"), "--train_file_pattern", "is required"),
    (dict(data_source="synthetic"), "--synthetic_root", "must not be empty"),
    (dict(synthetic=SyntheticConfig(root="r", image_size=16), data_source="synthetic"),
     "--synthetic_image_size", ">= 32"),
    (dict(synthetic=SyntheticConfig(root="r", palette_variation=1.5),
          data_source="synthetic"), "--synthetic_palette_variation", r"\[0, 1\]"),
    (dict(num_classes=0), "--num_classes", "must be > 0 with --data_source=random"),
    (dict(optimizer="adam"), "--optimizer", "must be one of"),
    (dict(end_learning_rate=1.0), "--end_learning_rate", "must be <= --learning_rate"),
    (dict(momentum=1.0), "--momentum", r"\[0, 1\)"),
    (dict(train_steps=0, epochs=0.0, data_source="random"), "--train_steps", "must be > 0"),
    (dict(warmup_steps=10), "--warmup_steps", "must be < --train_steps"),
    (dict(frozen_backbone_steps=10), "--frozen_backbone_steps", "must be < --train_steps"),
    (dict(arcface_margin=2.0), "--arcface_margin", "pi/2"),
    (dict(batchnorm_momentum=1.0), "--batchnorm_momentum", r"\(0, 1\)"),
    (dict(precision="float16"), "--precision", "must be one of"),
    (dict(strategy="tpu"), "--strategy", "must be one of"),
    (dict(checkpoint_every=0), "--checkpoint_every", "positive integer"),
    (dict(evaluation=EvalConfig(dataset="synth")), "--eval_root", "set together"),
    (dict(data_source="synthetic", synthetic=SyntheticConfig(root="r"),
          evaluation=EvalConfig(dataset="synth_val", data_root="r")), "--eval_dataset",
     "needs a validation split in the synthetic set it generates"),
    (dict(eval_untrained=True), "--eval_untrained", "needs --eval_dataset"),
    (dict(inject_nan_at_step=0), "--inject_nan_at_step", r"-1 \(off\)"),
    (dict(export_settings=ExportConfig(max_batch_pixels=1000)), "--export_max_batch_pixels",
     ">= max_scaled_pixels = 8388608"),
    (dict(export_settings=ExportConfig(max_image_bytes=2**31)), "--export_max_image_bytes",
     r"\[1, 2147483647\]"),
    (dict(model=ModelConfig(backbone="resnet18")), "--backbone", "must be one of"),
    (dict(model=ModelConfig(variant="glam")), "--variant", "must be one of"),
    (dict(model=ModelConfig(zero_init_residual=True)), "--zero_init_residual",
     "random initialisation only"),
])
def test_bad_values_name_the_flag(tmp_path, change, flag, rule):
    with pytest.raises(SettingError, match=rule) as err:
        _config(tmp_path, **change).validate()
    assert flag in str(err.value), str(err.value)


def test_missing_training_files_are_named(tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    c = _config(tmp_path, data_source="tfrecord",
                data=DataConfig(file_pattern=pattern, global_batch_size=8))
    with pytest.raises(SettingError, match=r"--train_file_pattern matches no file.*"
                       + "nothing-"):
        c.validate()
    (tmp_path / "nothing-0.tfrecord").write_bytes(b"")
    c.validate()
    with pytest.raises(SettingError, match="--eval_root is not a folder"):
        dataclasses.replace(c, evaluation=EvalConfig(
            dataset="roxford5k", data_root=str(tmp_path / "absent"))).validate()


def test_global_batch_must_split_over_replicas(tmp_path):
    c = _config(tmp_path, data=DataConfig(file_pattern="", global_batch_size=6))
    c.validate_for_replicas(3, 1)
    with pytest.raises(SettingError, match=r"--global_batch_size must be divisible by "
                       r"the number of replicas \(4: 2 worker\(s\)\); received "
                       r"--global_batch_size=6\. Use a multiple of 4"):
        c.validate_for_replicas(4, 2)


def test_cosine_schedule_per_step_and_optimizer(tmp_path):
    import keras

    from glam_tf.train.loop import make_optimizer, make_schedule

    c = _config(tmp_path, learning_rate=1e-3, end_learning_rate=3e-6, train_steps=100)
    schedule = make_schedule(c, 100)
    steps = np.array([0, 1, 25, 50, 99, 100])
    got = np.array([float(schedule(int(s))) for s in steps])
    # lr(t) = end + (peak - end) * (1 + cos(pi t / T)) / 2: peak at 0, end at T.
    want = 3e-6 + (1e-3 - 3e-6) * (1 + np.cos(np.pi * steps / 100)) / 2
    np.testing.assert_allclose(got, want, rtol=1e-5)
    warm = make_schedule(dataclasses.replace(c, warmup_steps=10), 100)
    np.testing.assert_allclose([float(warm(s)) for s in (0, 5, 10, 100)],
                               [0.0, 5e-4, 1e-3, 3e-6], rtol=1e-5, atol=1e-9)
    sgd = make_optimizer(c, schedule)
    assert isinstance(sgd, keras.optimizers.SGD)
    assert math.isclose(sgd.momentum, 0.9) and math.isclose(sgd.weight_decay, 1e-5)
    adamw = make_optimizer(dataclasses.replace(c, optimizer="adamw", weight_decay=0.05),
                           schedule)
    assert isinstance(adamw, keras.optimizers.AdamW)
    assert math.isclose(adamw.weight_decay, 0.05)


# Parses every flagfile with the real absl parser (nested --flagfile= included), builds the
# TrainConfig and validates it; data paths that only exist on a prepared machine are
# overridden with temporary stand-ins.
_PARSE_ALL = r"""
import json, sys
import train_main
from absl import flags
FLAGS = flags.FLAGS
out = {}
tfrecord, evalroot = sys.argv[1], sys.argv[2]
for path in sys.argv[3:]:
    FLAGS.unparse_flags()
    FLAGS(["train_main", "--flagfile=" + path])
    overrides = []
    if FLAGS.data_source == "tfrecord":
        overrides.append("--train_file_pattern=" + tfrecord)
    if FLAGS.eval_dataset and FLAGS.data_source != "synthetic":
        overrides.append("--eval_root=" + evalroot)
    FLAGS.unparse_flags()
    FLAGS(["train_main", "--flagfile=" + path] + overrides)
    config = train_main.config_from_flags()
    config.validate()
    out[path] = {"config": config.to_dict(),
                 "explicit": sorted(n for n in FLAGS if FLAGS[n].present)}
print("PARSED " + json.dumps(out))
"""


def test_every_flagfile_parses_and_validates(tmp_path):
    files = sorted(p for p in glob.glob("configs/*.flags", root_dir=REPO)
                   if not os.path.basename(p).startswith("eval_"))
    assert "configs/glam_r101_gldv2clean.flags" in files and "configs/demo.flags" in files
    tfrecord = tmp_path / "train-00000-of-00001.tfrecord"
    tfrecord.write_bytes(b"")
    proc = subprocess.run(
        ["timeout", "-k", "5", "120", sys.executable, "-c", _PARSE_ALL, str(tfrecord),
         str(tmp_path)] + files, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.split("PARSED ", 1)[1])
    paper = parsed["configs/glam_r101_gldv2clean.flags"]["config"]
    assert paper["optimizer"] == "sgd" and paper["learning_rate"] == 1e-3
    assert paper["momentum"] == 0.9 and paper["weight_decay"] == 1e-5
    assert paper["end_learning_rate"] == 3e-6 and paper["data"]["global_batch_size"] == 64
    assert (paper["arcface_margin"], paper["arcface_scale"]) == (0.3, 30.0)
    assert paper["model"] == {**ModelConfig().to_dict(), "weights": "imagenet"}
    assert paper["data"]["aspect_edges"] == [0.67, 0.77, 1.33, 1.5]
    assert paper["data"]["size_scale"] == 1.0 and paper["sync_batchnorm"]
    variants = {}
    for path, entry in parsed.items():
        name = os.path.basename(path)
        if name.startswith("ablation_"):
            cfg = entry["config"]
            variants[cfg["model"]["variant"]] = name
            # Only the variant and the output folder differ from the paper's file.
            for key in ("learning_rate", "optimizer", "data", "weight_decay", "epochs"):
                assert cfg[key] == paper[key], (name, key)
            assert {k: v for k, v in cfg["model"].items() if k != "variant"} == {
                k: v for k, v in paper["model"].items() if k != "variant"}
            assert cfg["train_dir"] != paper["train_dir"]
    assert sorted(variants) == sorted(VARIANTS)  # one flagfile per ablation row
    demo = parsed["configs/demo.flags"]["config"]
    assert demo["data_source"] == "synthetic" and demo["model"]["weights"] == "none"
    assert demo["evaluation"]["dataset"] == "synth" and demo["eval_untrained"]
    # The demo trains at the photos' own size and is exported and evaluated at twice the
    # training size, the paper's ratio (trained at <= 512 px, evaluated at 1024).
    data = {k: tuple(map(tuple, v)) if k == "bucket_sizes" else v
            for k, v in demo["data"].items()}
    buckets = DataConfig(**data).scaled_bucket_sizes()
    assert max(max(size) for size in buckets) == demo["synthetic"]["image_size"]
    assert demo["evaluation"]["max_image_size"] == demo["export_settings"]["max_image_size"] == (
        2 * demo["synthetic"]["image_size"])
    assert paper["evaluation"]["max_image_size"] == 2 * max(max(size) for size in paper["data"][
        "bucket_sizes"])
    _check_pretrained_regime(parsed)


# What a pretraining set changes in the generator beyond the set it stands beside: its
# buildings (seed, count), and no evaluation splits worth the time.
_SET_SIZES = ("seed", "root", "num_train_landmarks", "num_test_landmarks",
              "queries_per_landmark", "num_distractor_landmarks", "num_val_landmarks")


def _check_pretrained_regime(parsed):
    """configs/pretrain.flags and pretrain_demo.flags (bench/pretrain_backbone.py) against the
    evaluation sets and the regimes that start from their backbones."""
    pretrain = parsed["configs/pretrain.flags"]["config"]
    street = parsed["configs/street160.flags"]["config"]
    tuned = parsed["configs/street160_pretrained.flags"]["config"]
    assert pretrain["model"]["variant"] == "baseline" and pretrain["model"]["weights"] == "none"
    assert not pretrain["evaluation"]["dataset"] and not pretrain["export"]
    # A building is (generator seed, number): every synthetic set that is evaluated on is
    # drawn from another seed than the pretraining set, so none of its landmarks (test,
    # validation, distractors) nor its neighbour buildings is a pretraining building.
    evaluated = {path: entry["config"]["synthetic"]["seed"] for path, entry in parsed.items()
                 if entry["config"]["data_source"] == "synthetic"
                 and entry["config"]["evaluation"]["dataset"]}
    assert {"configs/demo.flags", "configs/demo_pretrained.flags", "configs/street.flags",
            "configs/street160.flags", "configs/street160_pretrained.flags"} <= set(evaluated)
    assert pretrain["synthetic"]["seed"] not in set(evaluated.values())
    # The same pretraining at the demo's photos and buckets, for the SGD regime on photos
    # whose colours do not name the building: the same photo settings, the paper's optimiser.
    small, demo, sgd = (parsed[f"configs/{n}.flags"]["config"]
                        for n in ("pretrain_demo", "demo", "demo_pretrained"))
    assert small["model"] == {**demo["model"], "variant": "baseline"}
    assert not small["evaluation"]["dataset"] and not small["export"]
    assert small["synthetic"]["seed"] not in set(evaluated.values())
    assert small["data"] == demo["data"] == sgd["data"]
    assert {k: v for k, v in small["synthetic"].items() if k not in _SET_SIZES} == {
        k: v for k, v in sgd["synthetic"].items() if k not in _SET_SIZES}
    assert sgd["synthetic"]["palette_variation"] == 0.5 and sgd["synthetic"]["num_val_landmarks"]
    assert sgd["model"] == {**demo["model"], "weights": "runs/pretrain_demo/backbone.weights.h5",
                            "zero_init_residual": False}
    assert (sgd["optimizer"], sgd["momentum"], sgd["weight_decay"]) == ("sgd", 0.9, 1e-5)
    # The screen's choice: the paper's rate after a head-only warm-up of half the run.
    assert (sgd["learning_rate"], sgd["end_learning_rate"]) == (1e-3, 1e-5)
    assert sgd["frozen_backbone_steps"] == sgd["train_steps"] // 2
    assert sgd["evaluation"]["max_image_size"] == demo["evaluation"]["max_image_size"]
    assert pretrain["synthetic"]["num_train_landmarks"] > street["synthetic"][
        "num_train_landmarks"]
    # The same photos and buckets as the street set it is used on: conv5 at least 5 x 5.
    for cfg in (pretrain, tuned):
        assert cfg["data"] == street["data"]
        assert cfg["synthetic"]["image_size"] == street["synthetic"]["image_size"]
        assert cfg["synthetic"]["frame_scale"] == street["synthetic"]["frame_scale"]
    data = {k: tuple(map(tuple, v)) if k == "bucket_sizes" else v
            for k, v in street["data"].items()}
    assert min(min(size) for size in DataConfig(**data).scaled_bucket_sizes()) >= 160
    assert street["evaluation"]["max_image_size"] == 2 * street["synthetic"]["image_size"]
    # The pretrained regime differs from scratch only in the backbone's start and at most the
    # rate (the validation screen chose 1e-3 -> 1e-5, the from-scratch rate, over 1e-4).
    differs = sorted(k for k in tuned if k not in ("model", "train_dir")
                     and tuned[k] != street[k])
    assert set(differs) <= {"end_learning_rate", "learning_rate"}, differs
    assert (tuned["learning_rate"], tuned["end_learning_rate"]) == (1e-3, 1e-5)
    assert tuned["model"] == {**street["model"], "weights": "runs/pretrain/backbone.weights.h5",
                              "zero_init_residual": False}


def _run_main(args, tmp_path, timeout=120):
    return subprocess.run(
        ["timeout", "-k", "5", str(timeout), sys.executable, "train_main.py"] + args,
        cwd=REPO, capture_output=True, text=True)


def test_cli_rejects_bad_values_before_any_work(tmp_path):
    train_dir = tmp_path / "run"
    common = [f"--train_dir={train_dir}", "--data_source=random", "--num_classes=4",
              "--train_steps=2", "--backbone=resnet50", "--weights=none"]
    proc = _run_main(common + ["--learning_rate=0"], tmp_path)
    assert proc.returncode != 0
    # The error and where the flags are listed: not the ~200 lines of flag help.
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "train_main: error: --learning_rate must be a finite number > 0; received "
        "--learning_rate=0.0.",
        "Run `python train_main.py --helpfull` for every flag and its help."]
    assert not train_dir.exists()  # failed before creating anything
    proc = _run_main(common + ["--variant=glam"], tmp_path)
    assert proc.returncode != 0 and "flag --variant=glam" in proc.stderr
    # Needs the strategy (2 logical CPUs -> 2 replicas), still before the model is built.
    proc = _run_main(common + ["--strategy=mirrored", "--logical_cpus=2",
                               "--global_batch_size=3"], tmp_path)
    assert proc.returncode != 0
    assert ("--global_batch_size must be divisible by the number of replicas (2: 1 "
            "worker(s)); received --global_batch_size=3") in proc.stderr
    assert "Synchronized" not in proc.stderr  # the model was never built
