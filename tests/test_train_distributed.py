"""Distributed training gives the single-replica result: MirroredStrategy over 2 logical
CPUs, and MultiWorkerMirroredStrategy with two worker processes on localhost.

Every run trains the stand-in model (keras_helpers.tiny_descriptor_model: two convs with
BatchNorm, then the real GLAM, GeM and head layers) on the "random" stand-in data, whose
global batch k is a pure function of (seed, k) however it is split, so every run sees the
same global batches.

Tolerance: replicas sum their gradients in another order than one device and synchronized
batch norm computes the moments as E[x^2] - E[x]^2 from all-reduced sums; in float32 that
moves the loss by ~1e-6 relative per step, growing slowly over a few SGD steps. We allow
2e-4 relative on losses and 2e-4 absolute plus 1e-4 relative on weights (of size up to ~3
after these steps; the largest differences, ~1e-4 relative, are on the largest weights).
Without synchronized
batch norm each replica normalises with its own half-batch statistics, and the losses
differ by far more (checked below), so the comparison does test the synchronisation.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

from glam_tf.train.reporting import read_scalars
from helpers import TESTS_DIR
from keras_helpers import DRIVER

REPO = pathlib.Path(__file__).resolve().parents[1]
LOSS_RTOL = 2e-4
WEIGHT_ATOL = 2e-4
WEIGHT_RTOL = 1e-4
STEPS = 4

COMMON_FLAGS = [
    "--data_source=random", "--num_classes=6", "--random_image_size=32,48",
    "--global_batch_size=8", f"--train_steps={STEPS}", "--checkpoint_every=2",
    "--summary_every=1", "--log_every=1", "--export=false", "--optimizer=sgd",
    "--learning_rate=0.05", "--backbone=resnet50", "--weights=none", "--reduced_channels=8",
    "--embedding_dim=16",
]

_MIRRORED = r"""
import json, sys
from glam_tf.train.distribute import split_logical_cpus
split_logical_cpus(2)
import tensorflow as tf
from glam_tf.config import DataConfig
from glam_tf.model import ModelConfig
from glam_tf.train import TrainConfig, train
sys.path.insert(0, sys.argv[2])
from keras_helpers import tiny_descriptor_model
root = sys.argv[1]
out = {}
# One MirroredStrategy for both 2-replica runs: a second one over the same devices in the
# same process collides with the first one's collective instance keys.
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for name, strategy, sync in (("one", tf.distribute.get_strategy(), True),
                             ("two", mirrored, True), ("two_unsynced", mirrored, False)):
    config = TrainConfig(
        train_dir=f"{root}/{name}", data_source="random", num_classes=6,
        random_image_size=(32, 48), data=DataConfig(file_pattern="", global_batch_size=8),
        model=ModelConfig(backbone="resnet50", weights="none", reduced_channels=8,
                          embedding_dim=16),
        optimizer="sgd", learning_rate=0.05, train_steps=4, checkpoint_every=4,
        sync_batchnorm=sync, export=False)
    result = train(config, strategy, model_fn=tiny_descriptor_model)
    out[name] = {"replicas": strategy.num_replicas_in_sync,
                 "losses": [result.losses[s] for s in sorted(result.losses)]}
print("RESULT " + json.dumps(out))
"""


def _model_weights(ckpt_dir):
    """Every float tensor of the newest checkpoint: model, head and optimizer slots.

    (tf.train.Checkpoint stores each variable once, under the first path it finds: the
    trainable weights appear as optimizer/_trainable_variables/<i>.)
    """
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt_dir)))
    return {k: reader.get_tensor(k) for k, d in reader.get_variable_to_dtype_map().items()
            if d.is_floating}


def _assert_weights_close(a, b, atol, rtol=0.0):
    """|a - b| <= atol + rtol * |b| for every element of every tensor."""
    assert a.keys() == b.keys() and len(a) > 40
    excess = {k: float(np.max(np.abs(a[k] - b[k]) - rtol * np.abs(b[k]))) for k in a}
    worst = max(excess, key=excess.get)
    assert excess[worst] <= atol, (
        f"{worst}: weight difference exceeds {atol} + {rtol} * |w| by "
        f"{excess[worst] - atol:.3g}")


def test_two_replicas_follow_the_one_replica_trajectory(tmp_path):
    proc = subprocess.run(["timeout", "-k", "5", "240", sys.executable, "-c", _MIRRORED,
                           str(tmp_path), TESTS_DIR], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert [out[k]["replicas"] for k in ("one", "two", "two_unsynced")] == [1, 2, 2]
    one, two = np.array(out["one"]["losses"]), np.array(out["two"]["losses"])
    assert len(one) == STEPS and np.all(np.isfinite(one))
    np.testing.assert_allclose(two, one, rtol=LOSS_RTOL)
    _assert_weights_close(_model_weights(tmp_path / "two" / "checkpoints"),
                          _model_weights(tmp_path / "one" / "checkpoints"), WEIGHT_ATOL,
                          WEIGHT_RTOL)
    # Per-replica batch statistics change the result well beyond the tolerance.
    unsynced = np.array(out["two_unsynced"]["losses"])
    assert np.max(np.abs(unsynced - one) / np.abs(one)) > 20 * LOSS_RTOL


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_worker_processes_agree_with_one_process(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            ["timeout", "-k", "5", "240", sys.executable, "-c", DRIVER,
             f"--train_dir={tmp_path / 'mwms'}", "--strategy=auto",
             "--collective_timeout_s=120"] + COMMON_FLAGS,
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    single = subprocess.run(
        ["timeout", "-k", "5", "240", sys.executable, "-c", DRIVER,
         f"--train_dir={tmp_path / 'single'}"] + COMMON_FLAGS,
        cwd=REPO, capture_output=True, text=True)
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]
    chief_log = outputs[0][1]
    assert "MultiWorkerMirroredStrategy: 2 replica(s), 2 worker(s); this is worker 0 (chief)" \
        in chief_log
    assert "this is worker 1." in outputs[1][1]
    # The chief writes the run's checkpoints and summaries; worker 1 its own checkpoints
    # (its data iterator) in its own folder.
    mwms = tmp_path / "mwms"
    assert tf.train.latest_checkpoint(str(mwms / "checkpoints")).endswith(f"ckpt-{STEPS}")
    worker1 = mwms / "worker_checkpoints" / "worker_1"
    assert tf.train.latest_checkpoint(str(worker1)).endswith(f"ckpt-{STEPS}")
    # Same global batches and summed gradients: same trajectory as one process.
    multi = read_scalars(str(mwms / "tensorboard"))["train/loss"]
    one = read_scalars(str(tmp_path / "single" / "tensorboard"))["train/loss"]
    assert sorted(multi) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([multi[s] for s in one], [one[s] for s in one], rtol=LOSS_RTOL)
    chief_w = _model_weights(mwms / "checkpoints")
    _assert_weights_close(chief_w, _model_weights(tmp_path / "single" / "checkpoints"),
                          WEIGHT_ATOL, WEIGHT_RTOL)
    # Both workers hold the same (mirrored) weights.
    _assert_weights_close(chief_w, _model_weights(worker1), 0.0)
