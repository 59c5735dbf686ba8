"""Checkpoint layout, resume, and the SIGTERM stop flag (TF_NOTES.md "Checkpoints and resume").

Layout: the chief's checkpoints in `<train_dir>/checkpoints/` (the folder export and
evaluation read), other workers' in `<train_dir>/worker_checkpoints/worker_<i>/`: every
worker checkpoints its own plain data iterator (a distributed iterator is not
checkpointable, tensorflow/tensorflow#56372), so every worker keeps its own files.
Checkpoints are numbered by step (`ckpt-<step>`).

Publishing: `tf.train.CheckpointManager.save` writes the checkpoint's files (through a
`ckpt-<step>_temp/` folder that TensorFlow merges into `ckpt-<step>.index` and `.data-*`),
then the `checkpoint` state file, whole (a temporary `checkpoint.tmp<hex>` renamed over it; on
an object store one object). The manager goes by that state file, so it counts a checkpoint
only once it is listed there, written last; resume, export and evaluation decide from the files
(below). `remove_unfinished_checkpoints` deletes the temporaries a killed save left; checkpoint
files themselves are never deleted there (one newer than the state file lists may be whole:
resume decides from the files).

Resume trusts the files, not the `checkpoint` state file: `recover` lists the `ckpt-<step>`
files, reads every tensor of the newest one back (each has a checksum in the index), moves a
damaged one aside (renamed `<file>.damaged-<UTC time>`, never deleted) and tries the next
older, then rewrites the state file from what is left before the CheckpointManager (which
prunes by that state) is made. A state file that is missing, garbage or names checkpoints
that are not there thus neither restarts the run from step 0 nor lets it save over intact
checkpoints under the same names.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorflow.python.checkpoint import checkpoint_management

from glam_tf import files
from glam_tf.config import contract
from glam_tf.config.contract import CHECKPOINT_NAME, checkpoint_files, verify_checkpoint
from glam_tf.train.distribute import WorkerInfo

STATE_FILE = "checkpoint"


def checkpoint_dir(train_dir: str, worker: WorkerInfo) -> str:
    """Where this worker keeps its checkpoints (glam_tf.config.contract's layout)."""
    return contract.checkpoints_dir(train_dir, 0 if worker.is_chief else worker.worker_index)


def _read_state(directory: str):
    """The parsed state file, or None when it is missing or cannot be parsed."""
    if not files.exists(files.join(directory, STATE_FILE)):
        return None
    try:
        return tf.train.get_checkpoint_state(directory)
    except (ValueError, tf.errors.OpError, text_format.ParseError):  # not text, not a proto
        return None


def _state_problem(directory: str, steps: list) -> Optional[str]:
    """What is wrong with the state file when the intact checkpoints are `steps`; None: ok."""
    path = files.join(directory, STATE_FILE)
    if not files.exists(path):
        return "is missing" if steps else None
    state = _read_state(directory)
    if state is None or not state.model_checkpoint_path:
        return "cannot be parsed"
    listed = [files.basename(p) for p in state.all_model_checkpoint_paths]
    expected = [f"{CHECKPOINT_NAME}-{s}" for s in steps]
    newest = files.basename(state.model_checkpoint_path)
    if not steps or newest != expected[-1] or set(listed) - set(expected):
        return (f"names {newest} as newest and lists {listed}, but the intact checkpoints "
                f"are {expected}")
    return None


@dataclasses.dataclass
class Recovery:
    """What `recover` found in a checkpoint folder.

    Attributes:
        steps: steps of the checkpoints kept, oldest first (the newest one verified).
        verified: steps whose every tensor was read back.
        damaged: step -> (why, names the files were moved aside to).
        state_rewritten: the state file was missing or wrong and was rewritten.
    """

    steps: list
    verified: set
    damaged: dict
    state_rewritten: bool


def _move_aside(directory: str, names: list, stamp: str) -> list:
    moved = []
    for name in names:
        target = f"{name}.damaged-{stamp}"
        files.rename(files.join(directory, name), files.join(directory, target))
        moved.append(target)
    return moved


def _rewrite_state(directory: str, steps: list, problem: str, stamp: str) -> None:
    """Rewrites the state file to list `steps` (see `recover`)."""
    path = files.join(directory, STATE_FILE)
    names = [f"{CHECKPOINT_NAME}-{s}" for s in steps]
    old = _read_state(directory)
    kept = "kept in rotation"
    if old is not None:  # keep the timestamps of the entries that are still there
        times = dict(zip((files.basename(p) for p in old.all_model_checkpoint_paths),
                         old.all_model_checkpoint_timestamps))
        timestamps = [times.get(n, time.time()) for n in names]
        preserved = old.last_preserved_timestamp
    else:  # no timestamps: the manager keeps them all out of its pruning
        timestamps, preserved = None, None
        kept = "kept and never pruned (their state was lost)"
    logging.warning("The checkpoint state file %s %s: rewritten from the checkpoint files "
                    "(%s %s).", path, problem, ", ".join(names) or "none left",
                    kept if names else "")
    if names:
        checkpoint_management.update_checkpoint_state_internal(
            directory, names[-1], names, save_relative_paths=True,
            all_model_checkpoint_timestamps=timestamps, last_preserved_timestamp=preserved)
    else:
        files.rename(path, files.join(directory, f"{STATE_FILE}.damaged-{stamp}"))


def recover(directory: str) -> Recovery:
    """Finds the newest checkpoint in `directory` that restores; repairs the state file.

    Lists the `ckpt-<step>` files (whatever the state file says), verifies the newest with
    `verify_checkpoint`, and while it is damaged logs why, renames its files to
    `<file>.damaged-<UTC time>` and tries the next older. Then, when the state file is
    missing, unparsable or disagrees with the files, rewrites it to list the checkpoints
    that are left (the newest one last): the CheckpointManager made afterwards numbers
    from a state that matches the files, so no later save reuses the name of an intact
    checkpoint. Nothing is pruned on a state in doubt: entries of a parsable state keep
    their timestamps (and their place in the keep_checkpoints rotation); checkpoints found
    without one get none, which the manager reads as "preserved" and never deletes.
    """
    found = checkpoint_files(directory)
    damaged, verified = {}, set()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for step in sorted(found, reverse=True):
        prefix = files.join(directory, f"{CHECKPOINT_NAME}-{step}")
        why = verify_checkpoint(prefix)
        if why is None:
            verified.add(step)
            break
        moved = _move_aside(directory, found[step], stamp)
        damaged[step] = (why, moved)
        logging.warning("Checkpoint %s is damaged (%s): moved aside as %s; trying the "
                        "previous one.", prefix, why, ", ".join(moved))
    steps = sorted(s for s in found if s not in damaged)
    problem = _state_problem(directory, steps)
    if problem:
        _rewrite_state(directory, steps, problem, stamp)
    return Recovery(steps=steps, verified=verified, damaged=damaged,
                    state_rewritten=bool(problem))


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
                   strategy: tf.distribute.Strategy, worker: WorkerInfo,
                   recovery: Recovery) -> int:
    """Restores the newest checkpoint every worker has; returns its step (0: none).

    `recovery` is what `recover` found in this worker's folder (before `manager` was made).
    All workers save at the same steps, so their newest checkpoints normally agree; a
    kill between two workers' saves leaves them one save apart, and every worker then
    goes back to the older one (kept: keep_checkpoints >= 2). Raises RuntimeError when
    the workers share no checkpoint or the common one is damaged.
    """
    steps = recovery.steps
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
    if target not in recovery.verified:
        why = verify_checkpoint(path)
        if why is not None:
            raise RuntimeError(
                f"Worker {worker.worker_index} cannot resume: the checkpoint all workers "
                f"share, {path}, is damaged ({why}). Delete the worker_checkpoints and "
                "checkpoints folders to start over.")
    checkpoint.restore(path).assert_existing_objects_matched()
    return target


class StopSignal:
    """Context manager: while active, SIGTERM stops the run promptly, at any point.

    During set-up (before `start_stepping()`) there is nothing to checkpoint: the process
    exits at once (status 128 + signal). While stepping, SIGTERM sets `requested`; the
    training loop polls it after each step, calls `finishing()`, saves a checkpoint and
    returns. A step that has not ended `grace_s` seconds after the signal is stuck (a
    blocked input pipeline, a dead peer): the process exits without a checkpoint.

    A Python signal handler runs only when the main thread is back in Python, never while it
    waits inside a TensorFlow op; so the signal is also written to a socket
    (`signal.set_wakeup_fd`, done by the C-level handler) that a watchdog thread reads.
    Outside the main thread (where Python cannot install handlers) it only logs.
    """

    def __init__(self, signals=(signal.SIGTERM,), grace_s: float = 120.0):
        self.signals = tuple(signals)
        self.grace_s = grace_s
        self.requested = False
        self._stepping = False
        self._finishing = threading.Event()
        self._previous = {}
        self._previous_wakeup = None
        self._sockets = None

    def start_stepping(self) -> None:
        """From now on SIGTERM waits for the running step (up to grace_s) to checkpoint."""
        self._stepping = True

    def finishing(self) -> None:
        """The loop has seen the request and is saving its checkpoint: no forced exit."""
        self._finishing.set()

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True      # the watchdog logs and times the stop

    def _exit(self, signum: int, why: str) -> None:
        logging.warning("%s; exiting now (status %d).", why, 128 + signum)
        logging.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def _watch(self, reader) -> None:
        while True:
            try:
                data = reader.recv(1)
            except OSError:
                return
            if not data:
                return                     # closed by __exit__
            signum = data[0]
            if signum not in self.signals:
                continue
            self.requested = True
            name = signal.Signals(signum).name
            if not self._stepping:
                self._exit(signum, f"Received {name} during set-up: no step has run, nothing "
                           "to checkpoint")
            logging.warning("Received %s: will checkpoint and stop after this step (within "
                            "%g s).", name, self.grace_s)
            if not self._finishing.wait(self.grace_s):
                self._exit(signum, f"Received {name} but the running step did not end within "
                           f"{self.grace_s:g} s (--stop_grace_s; stuck waiting for data?): "
                           "no checkpoint of it; rerun the same command to resume from the "
                           "last checkpoint")
            return

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Not in the main thread: SIGTERM will not checkpoint.")
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        threading.Thread(target=self._watch, args=(reader,), name="stop-signal-watchdog",
                         daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._finishing.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._sockets is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            reader, writer = self._sockets
            reader.shutdown(socket.SHUT_RDWR)
            writer.close()
            reader.close()
            self._sockets = None
        return False
