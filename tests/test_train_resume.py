"""Fault tolerance with real processes and real signals: SIGTERM checkpoints and exits
cleanly; SIGKILL mid-epoch loses only the steps since the last checkpoint; rerunning the
same command resumes (step, optimizer state, data stream) and ends exactly where an
uninterrupted run ends.

Data: small DELG-keyed TFRecords (4 classes x 6 images of 3 aspect ratios, 6 steps per
epoch) through the real input pipeline (seeded shuffle, aspect buckets, augmentation,
deterministic order); the process is train_main with the stand-in model
(keras_helpers.DRIVER), so a step takes milliseconds and the signals land
mid-run.
"""

import io
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf.data import records
from glam_tf.train.reporting import read_scalars
from keras_helpers import DRIVER

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60


def _write_records(path):
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for label in range(4):
            for k in range(6):
                width, height = ((64, 40), (48, 48), (40, 64))[k % 3]
                pixels = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
                image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=90)
                data = buf.getvalue()
                writer.write(records.make_example(
                    encoded=data, image_id=f"{label:02d}{k:014x}", label=label,
                    info=records.probe_image(data)).SerializeToString())


def _command(train_dir, pattern):
    return [sys.executable, "-c", DRIVER, f"--train_dir={train_dir}",
            "--data_source=tfrecord", f"--train_file_pattern={pattern}",
            "--global_batch_size=4", "--size_scale=0.1", "--shuffle_buffer=8",
            "--deterministic_data=true", f"--train_steps={STEPS}", "--checkpoint_every=2",
            "--keep_checkpoints=50", "--summary_every=1", "--log_every=10",
            "--optimizer=sgd", "--learning_rate=0.02", "--export=false",
            "--backbone=resnet50", "--weights=none", "--variant=local-channel",
            "--reduced_channels=8",
            "--embedding_dim=16"]


def _latest_step(train_dir):
    latest = tf.train.latest_checkpoint(os.path.join(train_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def _start(command):
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_after_checkpoint(proc, train_dir, min_step, sig, deadline_s=180):
    """Waits until a checkpoint at >= min_step exists, then sends `sig` to the process."""
    end = time.monotonic() + deadline_s
    while _latest_step(train_dir) < min_step:
        assert proc.poll() is None, "run ended before the signal:\n" + proc.stderr.read()[-3000:]
        assert time.monotonic() < end, "no checkpoint in time"
        time.sleep(0.02)
    assert proc.poll() is None, "run ended before the signal"
    proc.send_signal(sig)
    return proc.communicate(timeout=deadline_s)


def _all_numbers(train_dir):
    """Weights, optimizer slots and counters of the newest checkpoint.

    Left out: the iterator's opaque state, the input pipeline's decode counters, which
    count records read ahead into prefetch buffers (timing-dependent even without a kill),
    and the checkpoint's own save counter (an interrupted run saves more often).
    """
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(
        os.path.join(train_dir, "checkpoints")))
    return {k: reader.get_tensor(k) for k, d in reader.get_variable_to_dtype_map().items()
            if (d.is_floating or d.is_integer)
            and not k.startswith(("data_stats/", "save_counter/"))}


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(tmp_path):
    pattern = tmp_path / "train-00000-of-00001.tfrecord"
    _write_records(pattern)
    ref_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    procs = []
    try:
        reference = _start(_command(ref_dir, pattern))
        procs.append(reference)
        # 1. SIGTERM: the loop finishes its step, checkpoints it and exits with status 0.
        first = _start(_command(run_dir, pattern))
        procs.append(first)
        _, err = _signal_after_checkpoint(first, run_dir, 4, signal.SIGTERM)
        assert first.returncode == 0, err[-3000:]
        stopped = int(re.search(r"Stopped by SIGTERM at step (\d+)/", err).group(1))
        assert 4 <= stopped < STEPS and _latest_step(run_dir) == stopped
        # 2. Same command: resumes there; SIGKILL it mid-epoch (6 steps per epoch).
        second = _start(_command(run_dir, pattern))
        procs.append(second)
        _, err = _signal_after_checkpoint(second, run_dir, stopped + 5, signal.SIGKILL)
        assert second.returncode == -signal.SIGKILL
        assert f"at step {stopped} (optimizer iterations {stopped})" in err
        killed_at = _latest_step(run_dir)
        assert stopped + 5 <= killed_at < STEPS
        # 3. Same command again: resumes from the last checkpoint and completes.
        third = _start(_command(run_dir, pattern))
        procs.append(third)
        _, err = third.communicate(timeout=240)
        assert third.returncode == 0, err[-3000:]
        assert f"at step {killed_at} (optimizer iterations {killed_at})" in err
        _, ref_err = reference.communicate(timeout=240)
        assert reference.returncode == 0, ref_err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert _latest_step(run_dir) == _latest_step(ref_dir) == STEPS
    # Same weights, optimizer slots, step and iterations as the uninterrupted run; the
    # losses of every step (the data stream continued where it stopped) match too.
    ref, got = _all_numbers(ref_dir), _all_numbers(run_dir)
    assert ref.keys() == got.keys() and len(ref) > 20
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)
    ref_loss = read_scalars(os.path.join(ref_dir, "tensorboard"))["train/loss"]
    got_loss = read_scalars(os.path.join(run_dir, "tensorboard"))["train/loss"]
    assert sorted(ref_loss) == sorted(got_loss) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got_loss[s] for s in ref_loss],
                               [ref_loss[s] for s in ref_loss], rtol=1e-6)
    # Sanity: the losses are not constant (the data stream really varies).
    assert np.std(list(ref_loss.values())) > 1e-3


# ------------------------------------------------------------------ checkpoint fall-back
# In-process (tiny_train_config, 9 steps, a checkpoint every 3): a run whose checkpoint
# folder lost its state file, or whose newest checkpoint is damaged, resumes from the
# newest checkpoint that restores, moves the damaged one aside, never writes over an
# intact one, and ends with the weights of the uninterrupted run.

FALLBACK_STEPS = 9


def _fallback_config(train_dir):
    from keras_helpers import tiny_train_config  # noqa: PLC0415

    return tiny_train_config(train_dir, train_steps=FALLBACK_STEPS, checkpoint_every=3,
                             keep_checkpoints=10)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The checkpoints folder of an uninterrupted 9-step run (ckpt-3, ckpt-6, ckpt-9)."""
    from glam_tf.train import train  # noqa: PLC0415
    from keras_helpers import tiny_descriptor_model  # noqa: PLC0415

    run = tmp_path_factory.mktemp("uninterrupted")
    train(_fallback_config(run), model_fn=tiny_descriptor_model)
    return run / "checkpoints"


def _numbers(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k, d in reader.get_variable_to_dtype_map().items()
            if (d.is_floating or d.is_integer)
            and not k.startswith(("data_stats/", "save_counter/"))}


def _files(folder, step):
    return sorted(folder.glob(f"ckpt-{step}.index")) + sorted(
        folder.glob(f"ckpt-{step}.data-*"))


def _drop_state(folder):
    (folder / "checkpoint").unlink()


def _garbage_state(folder):
    (folder / "checkpoint").write_bytes(b"\x00\xffnot a text proto {{{")


def _truncate_data(folder):
    data = _files(folder, 9)[-1]
    data.write_bytes(data.read_bytes()[:-7])


def _empty_data(folder):
    _files(folder, 9)[-1].write_bytes(b"")


def _drop_index(folder):
    (folder / "ckpt-9.index").unlink()


def _truncate_index(folder):
    index = folder / "ckpt-9.index"
    index.write_bytes(index.read_bytes()[:len(index.read_bytes()) // 2])


# (damage, ckpt-9 present afterwards (damaged), log line expected)
FALLBACK_CASES = {
    "state_missing": (_drop_state, False, "checkpoint is missing: rewritten"),
    "state_garbage": (_garbage_state, False, "checkpoint cannot be parsed: rewritten"),
    "state_names_missing_checkpoint": (None, False, "names ckpt-9 as newest"),
    "data_truncated": (_truncate_data, True, "OutOfRangeError: Read less bytes than requested)"),
    "data_empty": (_empty_data, True, "OutOfRangeError: Read less bytes than requested)"),
    "index_missing": (_drop_index, True, "NotFoundError"),
    "index_truncated": (_truncate_index, True, "bad magic number"),
}


@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
def test_resume_falls_back_to_the_newest_checkpoint_that_restores(case, uninterrupted,
                                                                  tmp_path, caplog):
    from glam_tf.train import train  # noqa: PLC0415
    from keras_helpers import tiny_descriptor_model  # noqa: PLC0415

    damage, damaged_present, expected_log = FALLBACK_CASES[case]
    run = tmp_path / "run"
    folder = run / "checkpoints"
    shutil.copytree(uninterrupted, folder)
    if not damaged_present:  # killed before its step-9 save: the state still names ckpt-9
        for f in _files(folder, 9):
            f.unlink()
    if damage is not None:
        damage(folder)
    damaged = {f.name: f.read_bytes() for f in _files(folder, 9)}
    intact = {f.name: f.read_bytes() for s in (3, 6) for f in _files(folder, s)}

    caplog.set_level("INFO")
    result = train(_fallback_config(run), model_fn=tiny_descriptor_model)

    assert (result.start_step, result.final_step) == (6, FALLBACK_STEPS)
    assert expected_log in caplog.text
    if damaged_present:  # named in the log, moved aside with its bytes, not deleted
        assert f"Checkpoint {folder / 'ckpt-9'} is damaged" in caplog.text
        for name, data in damaged.items():
            [moved] = folder.glob(f"{name}.damaged-*")
            assert moved.read_bytes() == data
    # The intact checkpoints are untouched (never saved over, never pruned) ...
    assert {f.name: f.read_bytes() for s in (3, 6) for f in _files(folder, s)} == intact
    # ... the state file keeps them in rotation with the new ckpt-9, or, when their state
    # was lost, out of rotation (preserved: never pruned) ...
    state = tf.train.get_checkpoint_state(str(folder))
    lost = case in ("state_missing", "state_garbage")
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == (
        ["ckpt-9"] if lost else ["ckpt-3", "ckpt-6", "ckpt-9"])
    # ... which holds exactly what the uninterrupted run's ckpt-9 holds.
    ref, got = _numbers(uninterrupted / "ckpt-9"), _numbers(folder / "ckpt-9")
    assert ref.keys() == got.keys() and len(ref) > 20
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_every_checkpoint_damaged_starts_over_and_keeps_them(tmp_path, uninterrupted,
                                                             caplog):
    from glam_tf.train.checkpointing import recover  # noqa: PLC0415

    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted, folder)
    for step in (3, 6, 9):
        _files(folder, step)[-1].write_bytes(b"")
    recovery = recover(str(folder))
    assert recovery.steps == [] and sorted(recovery.damaged) == [3, 6, 9]
    assert not list(folder.glob("ckpt-*.index")) and not (folder / "checkpoint").exists()
    assert len(list(folder.glob("ckpt-*.damaged-*"))) == 6
    assert len(list(folder.glob("checkpoint.damaged-*"))) == 1
