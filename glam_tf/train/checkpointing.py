"""Checkpoint layout, resume, and the SIGTERM stop flag (TF_NOTES.md "Checkpoints and resume").

Layout: the chief's checkpoints in `<train_dir>/checkpoints/` (the folder export and
evaluation read), other workers' in `<train_dir>/worker_checkpoints/worker_<i>/`: every
worker checkpoints its own plain data iterator (a distributed iterator is not
checkpointable, tensorflow/tensorflow#56372), so every worker keeps its own files.
Checkpoints are numbered by step (`ckpt-<step>`).

Publishing: `tf.train.CheckpointManager.save` writes the checkpoint's files (through a
`ckpt-<step>_temp/` folder that TensorFlow merges into `ckpt-<step>.index` and `.data-*`),
then the `checkpoint` state file, whole (a temporary `checkpoint.tmp<hex>` renamed over it; on
an object store one object). Readers (`tf.train.latest_checkpoint`, the manager, export and
evaluation) go by that state file, so a checkpoint counts only once it is listed there, written
last. `remove_unfinished_checkpoints` deletes the temporaries a killed save left; checkpoint
files themselves are never deleted there (one newer than the state file lists may be whole:
resume decides from the files).
"""

from __future__ import annotations

import re
import signal
import threading

import numpy as np
import tensorflow as tf
from absl import logging

from glam_tf import files
from glam_tf.config import contract
from glam_tf.train.distribute import WorkerInfo

CHECKPOINT_NAME = "ckpt"


def checkpoint_dir(train_dir: str, worker: WorkerInfo) -> str:
    """Where this worker keeps its checkpoints (glam_tf.config.contract's layout)."""
    return contract.checkpoints_dir(train_dir, 0 if worker.is_chief else worker.worker_index)


def checkpoint_steps(manager: tf.train.CheckpointManager) -> list:
    """Steps of the checkpoints `manager` knows, oldest first."""
    steps = []
    for path in manager.checkpoints:
        match = re.search(rf"{CHECKPOINT_NAME}-(\d+)$", path)
        if match:
            steps.append(int(match.group(1)))
    return steps


def remove_unfinished_checkpoints(manager: tf.train.CheckpointManager) -> list:
    """Deletes the temporaries a killed save left in `manager.directory` (TensorFlow's
    `ckpt-<step>_temp/` and `checkpoint.tmp<hex>`); returns the deleted paths. Checkpoint
    files (`ckpt-<step>.index`, `.data-*`) are never deleted here. Call it before training,
    when this worker alone writes the folder.
    """
    directory = manager.directory
    if not files.isdir(directory):
        return []
    removed = []
    for name in files.listdir(directory):
        name = name.rstrip("/")
        if name.startswith("checkpoint.tmp") or re.fullmatch(rf"{CHECKPOINT_NAME}-\d+_temp", name):
            path = files.join(directory, name)
            if files.isdir(path):
                files.rmtree(path)
            else:
                files.remove(path)
            removed.append(path)
    for path in removed:
        logging.warning("Removed %s, left by a checkpoint save that was killed.", path)
    return removed


def _gather_per_worker(strategy: tf.distribute.Strategy, worker: WorkerInfo,
                       value: int) -> np.ndarray:
    """(num_workers,) int64: every worker's `value`, by an all-reduce of one-hot rows."""
    row = np.zeros((worker.num_workers,), np.int64)
    row[worker.worker_index] = value

    def value_fn(ctx):
        first_local = ctx.replica_id_in_sync_group % worker.local_replicas == 0
        return tf.constant(row if first_local else np.zeros_like(row))

    per_replica = strategy.experimental_distribute_values_from_function(value_fn)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def restore_latest(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
                   strategy: tf.distribute.Strategy, worker: WorkerInfo) -> int:
    """Restores the newest checkpoint every worker has; returns its step (0: none).

    All workers save at the same steps, so their newest checkpoints normally agree; a
    kill between two workers' saves leaves them one save apart, and every worker then
    goes back to the older one (kept: keep_checkpoints >= 2). Raises RuntimeError when
    the workers share no checkpoint.
    """
    steps = checkpoint_steps(manager)
    newest = steps[-1] if steps else 0
    if worker.num_workers > 1:
        newest_per_worker = _gather_per_worker(strategy, worker, newest)
        target = int(newest_per_worker.min())
    else:
        target = newest
    if target == 0:
        if worker.num_workers > 1 and newest_per_worker.max() > 0:
            raise RuntimeError(
                f"Cannot resume: the workers' newest checkpoints are at steps "
                f"{newest_per_worker.tolist()} (worker order); a worker without checkpoints "
                "has no data iterator to continue (was the number of workers changed?). "
                "Resume with the original cluster, or start a new --train_dir.")
        return 0
    if target not in steps:
        raise RuntimeError(
            f"Worker {worker.worker_index} cannot resume: the workers' newest "
            f"checkpoints are at steps {newest_per_worker.tolist()} and this worker "
            f"({manager.directory}) has no checkpoint at step {target} (it has {steps}). "
            "Delete the worker_checkpoints and checkpoints folders to start over.")
    path = files.join(manager.directory, f"{CHECKPOINT_NAME}-{target}")
    checkpoint.restore(path).assert_existing_objects_matched()
    return target


class StopSignal:
    """Context manager: while active, SIGTERM sets `requested` instead of killing.

    The training loop polls `requested` after each step, saves a checkpoint and returns.
    Outside the main thread (where Python cannot install handlers) it only logs.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.requested = True
        logging.warning("Received %s: will checkpoint and stop after this step.",
                        signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        else:
            logging.warning("Not in the main thread: SIGTERM will not checkpoint.")
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False
