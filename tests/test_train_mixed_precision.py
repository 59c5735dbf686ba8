"""Mixed-precision training: mixed_float16 with Keras 3 dynamic loss scaling.

- The first steps' gradients under mixed_float16 (scaled, then unscaled by the
  LossScaleOptimizer) match float32's from the same weights and batch.
- A forced overflow (a loss scale far too high) skips the update: trainable weights
  unchanged, the scale halved, the loss finite and the NaN guard silent; the scale then
  comes down until steps apply.
- The dynamic scale lives in the checkpoint: a resume continues from the saved scale,
  not from --loss_scale.
- Under MirroredStrategy (2 logical CPUs) the replicas agree on skipping, and two
  replicas follow the one-replica mixed_float16 trajectory.

Tolerance of the gradient comparison (GRAD_RTOL). The descriptor leaves the network in
float16, whose unit roundoff is u = 2^-11 ~ 4.9e-4 (more after a few float16 layers);
ArcFace multiplies the cosines by s = 30, so the logits carry absolute errors of order
s*u ~ 1.5e-2, and the cross-entropy gradient (softmax - one-hot), like everything
backpropagated from it, carries relative errors of that order. We allow 2*s*u ~ 2.9e-2
on the whole gradient (all variables as one vector); measured on this model 1.0e-2 to
1.7e-2 over the first three steps. Per variable we allow 5*s*u ~ 7.3e-2 relative to the
larger of its own gradient norm and 1% of the whole gradient's: the global-channel key
bias has a zero gradient in exact arithmetic (softmax is shift-invariant), so its
float32 "gradient" is rounding noise and no relative bound applies to it.
"""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from glam_tf.model import ArcFace
from glam_tf.train import NonFiniteLossError, train
from glam_tf.train.loop import dtype_policy, loss_scale, make_optimizer
from glam_tf.train.reporting import read_scalars
from glam_tf.train.step import make_train_step
from helpers import TESTS_DIR
from keras_helpers import TINY_MODEL, tiny_descriptor_model, tiny_train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = TINY_MODEL
FLOAT16_ROUNDOFF = 2.0 ** -11
ARCFACE_SCALE = 30.0
GRAD_RTOL = 2 * ARCFACE_SCALE * FLOAT16_ROUNDOFF        # ~2.9e-2, whole gradient
VAR_RTOL = 5 * ARCFACE_SCALE * FLOAT16_ROUNDOFF         # ~7.3e-2, per variable
# No step of this model and batch overflows at 2^10 (the first applied scale from 2^15
# is 2^11): the comparison sees three applied steps, not skips.
SAFE_SCALE = 2.0 ** 10
# Far above what any step survives: every step overflows in float16 and is skipped.
OVERFLOW_SCALE = 2.0 ** 40


def _config(train_dir="unused", **kw):
    return tiny_train_config(train_dir, **{"checkpoint_every": 2, "log_every": 1, **kw})


def _gradients_of_first_steps(precision, initial_weights, steps=3, lr=1e-3):
    """[(per-variable gradients, optimizer)] of `steps` train steps on one fixed batch.

    Plain SGD (no momentum, no decay) at `lr`: w_before - w_after = lr * g (float32
    variables under every policy), so the update recovers the applied (unscaled) gradient.
    """
    config = _config(precision=precision, momentum=0.0, weight_decay=0.0,
                     loss_scale=SAFE_SCALE)
    with dtype_policy(precision):
        model = tiny_descriptor_model(MODEL)
    head = ArcFace(6, name="arcface", dtype="float32")
    head.build((None, MODEL.embedding_dim))
    model.set_weights(initial_weights[0])
    head.set_weights(initial_weights[1])
    optimizer = make_optimizer(config, lr)
    variables = model.trainable_variables + head.trainable_variables
    optimizer.build(variables)
    step = tf.Variable(0, dtype=tf.int64)
    train_step = make_train_step(tf.distribute.get_strategy(), model, head, optimizer, step,
                                 global_batch_size=8, local_replicas=1)
    rng = np.random.default_rng(0)
    batch = (rng.uniform(0, 255, (8, 32, 48, 3)).astype(np.float32),
             rng.integers(0, 6, 8).astype(np.int64))
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    gradients = []
    for _ in range(steps):
        before = [v.numpy().copy() for v in variables]
        loss, _, _ = train_step(iterator, tf.constant(0, tf.int32))
        assert np.isfinite(loss.numpy())
        gradients.append([(b - v.numpy()) / lr for b, v in zip(before, variables)])
    return gradients, optimizer, [v.path for v in variables]


def test_mixed_float16_gradients_match_float32():
    keras.utils.set_random_seed(0)
    model = tiny_descriptor_model(MODEL)
    head = ArcFace(6, dtype="float32")
    head.build((None, MODEL.embedding_dim))
    initial = (model.get_weights(), head.get_weights())
    reference, plain, names = _gradients_of_first_steps("float32", initial)
    mixed, scaled, _ = _gradients_of_first_steps("mixed_float16", initial)
    assert not isinstance(plain, keras.optimizers.LossScaleOptimizer)
    assert isinstance(scaled, keras.optimizers.LossScaleOptimizer)
    assert int(scaled.iterations.numpy()) == 3 and loss_scale(scaled) == SAFE_SCALE
    for step, (g32, g16) in enumerate(zip(reference, mixed), start=1):
        total = np.sqrt(sum(np.sum(g ** 2) for g in g32))
        error = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(g16, g32)))
        assert error <= GRAD_RTOL * total, (step, error / total)
        for name, a, b in zip(names, g16, g32):
            bound = VAR_RTOL * max(np.linalg.norm(b), 0.01 * total)
            assert np.linalg.norm(a - b) <= bound, (step, name, np.linalg.norm(a - b),
                                                    np.linalg.norm(b), total)


def test_bfloat16_needs_no_loss_scale():
    optimizer = make_optimizer(_config(precision="mixed_bfloat16"), 0.1)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert loss_scale(optimizer) is None


def _optimizer_floats(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k, d in reader.get_variable_to_dtype_map().items()
            if k.startswith("optimizer/") and d.is_floating and reader.get_tensor(k).ndim == 0}


def test_overflow_skips_the_step_and_the_scale_is_checkpointed(tmp_path):
    built = []

    def model_fn(config):
        built.append(tiny_descriptor_model(config))
        built.append([w.numpy().copy() for w in built[-1].trainable_weights])
        return built[-2]

    run = tmp_path / "run"
    result = train(_config(run, precision="mixed_float16", loss_scale=OVERFLOW_SCALE,
                           train_steps=2), model_fn=model_fn)
    # Both steps overflowed: skipped, the loss finite (no NaN guard), weights untouched.
    assert result.skipped_steps == [1, 2]
    assert all(np.isfinite(v) for v in result.losses.values())
    model, initial = built[:2]  # the trained model (later calls: float32 copies)
    for w, w0 in zip(model.trainable_weights, initial):
        np.testing.assert_array_equal(w.numpy(), w0, err_msg=w.path)
    floats = _optimizer_floats(str(run / "checkpoints" / "ckpt-2"))
    assert OVERFLOW_SCALE / 4 in floats.values(), floats   # halved twice, saved
    # Resume with another --loss_scale: the checkpoint's scale wins (2^38, halved again
    # at step 3 since it still overflows), the flag's 2^12 does not come back.
    again = train(_config(run, precision="mixed_float16", loss_scale=2.0 ** 12,
                          train_steps=3), model_fn=tiny_descriptor_model)
    assert (again.start_step, again.skipped_steps) == (2, [3])
    scales = read_scalars(str(run / "tensorboard"))["train/loss_scale"]
    assert [scales[s] for s in (1, 2, 3)] == [OVERFLOW_SCALE / 2, OVERFLOW_SCALE / 4,
                                              OVERFLOW_SCALE / 8]


def test_scale_comes_down_until_steps_apply(tmp_path):
    result = train(_config(tmp_path / "run", precision="mixed_float16",
                           loss_scale=2.0 ** 15, train_steps=8),
                   model_fn=tiny_descriptor_model)
    # From 2^15 the first steps overflow (this model's gradients need <= 2^11); later
    # steps apply, with an occasional skip where a batch's gradients are larger.
    skipped = result.skipped_steps
    assert skipped[:1] == [1] and len(skipped) < 8, skipped
    assert all(np.isfinite(v) for v in result.losses.values())
    values = _optimizer_floats(str(tmp_path / "run" / "checkpoints" / "ckpt-8"))
    assert 2.0 ** 15 / 2 ** len(skipped) in values.values()


def test_a_nan_loss_still_stops_mixed_float16(tmp_path):
    with pytest.raises(NonFiniteLossError, match="The loss is nan at step 3"):
        train(_config(tmp_path / "run", precision="mixed_float16", loss_scale=SAFE_SCALE,
                      inject_nan_at_step=3), model_fn=tiny_descriptor_model)


_MIRRORED = r"""
import json, sys
from glam_tf.train.distribute import split_logical_cpus
split_logical_cpus(2)
import numpy as np
import tensorflow as tf
from glam_tf.config import DataConfig
from glam_tf.model import ModelConfig
from glam_tf.train import TrainConfig, train
from glam_tf.train.step import _agree_on_overflow
sys.path.insert(0, sys.argv[2])
from keras_helpers import tiny_descriptor_model
root = sys.argv[1]
out = {}
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

# Replica 1 overflows, replica 0 does not: after the agreement both see a non-finite
# first gradient (so both skip), and finite replicas stay untouched otherwise.
@tf.function
def agree(bad_replica):
    def fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        g0 = tf.where(tf.equal(rid, bad_replica), float("inf"), 1.0) * tf.ones((3,))
        return [tf.reduce_all(tf.math.is_finite(g)) for g in _agree_on_overflow(
            [None, g0, tf.ones((2,))]) if g is not None]
    return [mirrored.experimental_local_results(x) for x in mirrored.run(fn)]
out["agree_bad1"] = [[bool(v) for v in x] for x in agree(tf.constant(1))]
out["agree_none"] = [[bool(v) for v in x] for x in agree(tf.constant(-1))]

for name, strategy in (("one", tf.distribute.get_strategy()), ("two", mirrored)):
    config = TrainConfig(
        train_dir=f"{root}/{name}", data_source="random", num_classes=6,
        random_image_size=(32, 48), data=DataConfig(file_pattern="", global_batch_size=8),
        model=ModelConfig(backbone="resnet50", weights="none", reduced_channels=8,
                          embedding_dim=16),
        optimizer="sgd", learning_rate=0.005, train_steps=6, checkpoint_every=6,
        precision="mixed_float16", loss_scale=2.0 ** 13, export=False)
    result = train(config, strategy, model_fn=tiny_descriptor_model)
    out[name] = {"replicas": strategy.num_replicas_in_sync, "skipped": result.skipped_steps,
                 "losses": [result.losses[s] for s in sorted(result.losses)]}
print("RESULT " + json.dumps(out))
"""


def test_mirrored_replicas_skip_together_and_follow_one_replica(tmp_path):
    proc = subprocess.run(["timeout", "-k", "5", "240", sys.executable, "-c", _MIRRORED,
                           str(tmp_path), TESTS_DIR], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # Per gradient (the None one left alone), per replica: finite?
    assert out["agree_bad1"] == [[False, False], [True, True]]
    assert out["agree_none"] == [[True, True], [True, True]]
    one, two = out["one"], out["two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["skipped"] == two["skipped"] and len(one["skipped"]) < 6, (one, two)
    # Until the first applied update every step runs at the initial weights: the float16
    # forward passes differ only by the per-replica split, within 2u ~ 1e-3 (measured
    # <= 1.5e-4). After it the float16 gradients (relative error ~s*u, see the module
    # docstring) move the trajectories apart: 3*s*u ~ 4.4e-2 (measured <= 1.2e-2).
    first_applied = min(set(range(1, 7)) - set(one["skipped"]))
    a, b = np.array(two["losses"]), np.array(one["losses"])
    np.testing.assert_allclose(a[:first_applied], b[:first_applied],
                               rtol=2 * FLOAT16_ROUNDOFF)
    np.testing.assert_allclose(a, b, rtol=3 * ARCFACE_SCALE * FLOAT16_ROUNDOFF)
