"""The training loop in-process: checkpoint layout, TensorBoard scalars, NaN guard, and a
synthetic-data run through export and evaluation (untrained vs trained).

The stand-in model (keras_helpers.tiny_descriptor_model: two convs + the real GLAM,
GeM and head layers) keeps every test to seconds; the loop does not depend on the backbone.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import keras
import tensorflow as tf

from glam_tf.config import DataConfig, EvalConfig, ExportConfig, SyntheticConfig
from glam_tf.model import ModelConfig, all_layers
from glam_tf.train import NonFiniteLossError, train
from glam_tf.train.reporting import read_scalars
from keras_helpers import TINY_MODEL, tiny_descriptor_model, tiny_train_config

MODEL = TINY_MODEL
_config = tiny_train_config


def _checkpoint_values(prefix):
    """name -> value of a checkpoint's tensors; the iterator's variant state as None."""
    reader = tf.train.load_checkpoint(prefix)
    return {k: (None if dtype == tf.variant else reader.get_tensor(k))
            for k, dtype in reader.get_variable_to_dtype_map().items()
            if not k.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def test_checkpoints_summaries_and_layout(tmp_path):
    result = train(_config(tmp_path / "run"), model_fn=tiny_descriptor_model)
    run = tmp_path / "run"
    assert (result.start_step, result.final_step, result.total_steps) == (0, 6, 6)
    assert sorted(result.losses) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for v in result.losses.values())
    # Layout of the contract: checkpoints/ (CheckpointManager) and model_config.json.
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-6")
    assert os.path.exists(run / "checkpoints" / "ckpt-3.index")
    with open(run / "model_config.json") as f:
        assert ModelConfig.from_dict(json.load(f)) == MODEL
    values = _checkpoint_values(str(run / "checkpoints" / "ckpt-6"))
    roots = {k.split("/")[0] for k in values}
    assert {"model", "head", "optimizer", "step", "iterator"} <= roots, roots
    assert values["step/.ATTRIBUTES/VARIABLE_VALUE"] == 6
    iterations = [v for k, v in values.items() if k.startswith("optimizer/") and
                  "iteration" in k]
    assert iterations and int(iterations[0]) == 6
    # TensorBoard: loss per step as returned, GeM p and the three fusion weights.
    scalars = read_scalars(str(run / "tensorboard"))
    np.testing.assert_allclose([scalars["train/loss"][s] for s in range(1, 7)],
                               [result.losses[s] for s in range(1, 7)], rtol=1e-6)
    assert scalars["train/learning_rate"][1] == pytest.approx(0.05, rel=1e-6)
    fusion = [scalars[f"attention/fusion/{b}"][6] for b in ("local", "global", "identity")]
    assert sum(fusion) == pytest.approx(1.0, abs=1e-5)
    assert scalars["attention/gem_p"][6] == pytest.approx(result.attention["gem_p"])
    assert scalars["attention/gem_p"][6] != 3.0  # p is learned
    # Rerun with a longer schedule: resumes at 6, not from scratch.
    again = train(_config(run, train_steps=8), model_fn=tiny_descriptor_model)
    assert (again.start_step, again.final_step) == (6, 8)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _config(tmp_path / "run", inject_nan_at_step=5, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"The loss is nan at step 5.*ckpt-4"):
        train(config, model_fn=tiny_descriptor_model)
    ckpt_dir = str(tmp_path / "run" / "checkpoints")
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
    values = _checkpoint_values(os.path.join(ckpt_dir, "ckpt-4"))
    floats = [v for v in values.values() if v is not None and v.dtype.kind == "f"]
    assert floats and all(np.isfinite(v).all() for v in floats)


def test_batchnorm_momentum_reaches_every_layer(tmp_path):
    built = []

    def model_fn(config):
        built.append(tiny_descriptor_model(config))
        return built[-1]

    train(_config(tmp_path / "run", train_steps=1, batchnorm_momentum=0.25),
          model_fn=model_fn)
    layers = [l for l in all_layers(built[0])
              if isinstance(l, keras.layers.BatchNormalization)]
    assert layers and all(l.momentum == 0.25 for l in layers)
    # Taken at trace time: after one step from (mean 0, var 1) every moving variance is
    # 0.25 * 1 + 0.75 * (a batch variance >= 0), so never below 0.25, and it moved.
    for layer in layers:
        var = np.asarray(layer.moving_variance)
        assert var.min() >= 0.25 - 1e-6 and np.abs(var - 1.0).max() > 1e-3, layer.name


def test_frozen_backbone_steps_train_everything_but_the_backbone(tmp_path):
    """--frozen_backbone_steps=3 of 6: at step 3 the backbone's trainable weights are those
    it was built with (its momentum slots still zero) while GLAM, GeM, the whitening and the
    ArcFace head moved; from step 4 on the backbone trains too."""
    initial = {}

    def model_fn(config):
        model = tiny_descriptor_model(config)
        initial.setdefault("values", {v.path: np.array(v) for v in model.trainable_variables})
        return model

    run = tmp_path / "run"
    config = _config(run, model=dataclasses.replace(MODEL, variant="global+local"),
                     frozen_backbone_steps=3, momentum=0.9)
    train(config, model_fn=model_fn)
    for step in (3, 6):
        model = model_fn(config.model)
        backbone = {v.path for v in model.get_layer("backbone").trainable_variables}
        tf.train.Checkpoint(model=model).read(
            str(run / "checkpoints" / f"ckpt-{step}")).expect_partial()
        for variable in model.trainable_variables:
            unchanged = np.array_equal(np.array(variable), initial["values"][variable.path])
            assert unchanged == (step == 3 and variable.path in backbone), (step, variable.path)
    slots = [v for k, v in _checkpoint_values(str(run / "checkpoints" / "ckpt-3")).items()
             if k.startswith("optimizer/") and v is not None and v.ndim == 4]
    # Momentum of the conv kernels: zero for the backbone's two, non-zero for GLAM's.
    assert sum(not np.any(v) for v in slots) == 2 and any(np.any(v) for v in slots)
    with pytest.raises(ValueError, match="needs a layer named 'backbone'"):
        train(_config(tmp_path / "plain", frozen_backbone_steps=1), model_fn=_without_backbone)


def _without_backbone(config):
    image = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2)(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(config.embedding_dim)(x)
    return keras.Model(image, keras.layers.UnitNormalization()(x), name="plain")


def test_synthetic_run_exports_and_evaluates_untrained_and_trained(tmp_path, capsys):
    synth = SyntheticConfig(root=str(tmp_path / "synth"), num_train_landmarks=4,
                            images_per_landmark=4, num_test_landmarks=2,
                            queries_per_landmark=2, num_distractor_landmarks=1, image_size=64)
    config = _config(
        tmp_path / "run", data_source="synthetic", synthetic=synth, num_classes=0,
        data=DataConfig(global_batch_size=4, size_scale=0.1, shuffle_buffer=16),
        train_steps=3, export=True,
        export_settings=ExportConfig(scales=(1.0,), max_image_size=64),
        evaluation=EvalConfig(dataset="synth", data_root=synth.root, max_image_size=64,
                              scales=(1.0,), visualize=("0",), visualize_attention=True),
        eval_untrained=True)
    result = train(config, model_fn=tiny_descriptor_model)
    out = capsys.readouterr().out
    assert result.final_step == 3
    # 4 landmarks -> 4 ArcFace classes, read from the converter's summary.
    values = _checkpoint_values(tf.train.latest_checkpoint(str(tmp_path / "run" /
                                                               "checkpoints")))
    centers = [v for k, v in values.items()
               if k.startswith("head/") and v is not None and v.ndim == 2]
    assert centers and centers[0].shape == (4, 16)
    # The export is a loadable SavedModel giving the model's descriptor.
    assert os.path.isfile(os.path.join(result.export_dir, "saved_model.pb"))
    loaded = tf.saved_model.load(result.export_dir)
    image = tf.cast(tf.random.uniform((48, 64, 3), 0, 255), tf.uint8)
    desc = loaded.signatures["global_descriptor"](input_image=image)["global_descriptor"]
    assert desc.shape == (16,) and abs(float(tf.norm(desc)) - 1.0) < 1e-4
    # Both evaluations went through the evaluator and printed their tables.
    for res in (result.untrained_evaluation, result.evaluation):
        assert res["status"] == "complete" and res["counts"]["queries"] == 4
        assert 0.0 <= res["metrics"]["medium"]["mAP"] <= 100.0
        # --eval_visualize_attention: the in-memory model's maps beside the top-10 picture.
        assert os.path.isfile(res["outputs"]["attention_png"]), res["outputs"]
        assert os.path.dirname(res["outputs"]["attention_png"]) == os.path.dirname(
            res["outputs"]["png"])
    assert out.count("| synth") >= 2 or out.count("| Synth") >= 2, out
    assert "Untrained (step 0): mAP E" in out and "Trained (step 3): mAP E" in out
    # Beside them, the colour histogram on the same split (no learning).
    from glam_tf.eval import yardstick
    assert result.yardstick == yardstick.evaluate(synth.root, "synth")
    assert yardstick.format_lines(result.yardstick) in out
