"""Publishing: a shard, a checkpoint and an export version are visible only when complete,
on a local disk and on `ram://` (which publishes folders by copying, as an object store
does); a writer killed in the middle leaves nothing a reader takes, and the next run removes
what it left.

On a local disk the kill is a real SIGKILL of a subprocess; `ram://` lives inside one
process, so there the writer is stopped by an exception injected in the middle, and what a
SIGKILL would leave (a temporary file) is put there as the local test shows it is left.
"""

import io
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf import files
from glam_tf.config import contract
from glam_tf.data import gldv2, records
from glam_tf.export import export_saved_model, serving
from glam_tf.train import checkpointing, train
from helpers import TESTS_DIR
from keras_helpers import tiny_descriptor_model, tiny_keras_model, tiny_train_config

REPO_ROOT = os.path.dirname(TESTS_DIR)
IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "local" else f"ram://pub-{uuid.uuid4().hex[:8]}"


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _make_gldv2(root):
    """6 images of 2 landmarks in the GLDv2 layout under `root` (any file system)."""
    rows = {}
    for k in range(6):
        image_id = f"{k:04x}ab12cd34ef56"
        path = gldv2.gldv2_image_path(gldv2.train_image_dir(root), image_id)
        files.makedirs(files.dirname(path))
        files.write_bytes_atomic(path, _jpeg(k))
        rows.setdefault(100 + k % 2, []).append(image_id)
    gldv2.write_clean_csv(files.join(root, gldv2.CSV_CLEAN), sorted(rows.items()))


def _outputs(out):
    return {n: files.read_bytes(files.join(out, n)) for n in files.walk_files(out)
            if n != gldv2.PLAN_NAME}


# ---------------------------------------------------------------------------- converter


def test_converter_shard_killed_by_sigkill_is_never_visible_and_is_cleaned(tmp_path):
    root, out = str(tmp_path / "gldv2"), str(tmp_path / "out")
    _make_gldv2(root)
    driver = textwrap.dedent(f"""
        import os, signal, sys
        from glam_tf.data import gldv2, records
        real = records.make_example
        calls = []
        def make_example(**kw):
            calls.append(1)
            if len(calls) == 2:  # the first shard is half written: kill the whole process
                print("mid-shard", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(**kw)
        records.make_example = make_example
        gldv2.convert_gldv2({root!r}, {out!r}, num_shards=2, beam_args={IN_MEMORY!r})
    """)
    proc = subprocess.run([sys.executable, "-c", driver], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and "mid-shard" in proc.stdout, proc.stderr
    left = files.listdir(out)
    partial = [n for n in left if files.TEMPORARY_TAG in n]
    assert len(partial) == 1 and partial[0].startswith("train-000"), left
    assert not files.glob(files.join(out, gldv2.TRAIN_PATTERN))  # nothing a reader takes
    assert contract.CONVERTER_SUMMARY_FILE not in left

    summary = gldv2.convert_gldv2(root, out, num_shards=2, beam_args=IN_MEMORY)
    assert summary.total_written == 6
    assert not [n for n in files.walk_files(out) if files.TEMPORARY_TAG in n]
    clean = str(tmp_path / "clean")
    gldv2.convert_gldv2(root, clean, num_shards=2, beam_args=IN_MEMORY)
    assert _outputs(out) == _outputs(clean)


def test_converter_interrupted_mid_shard_then_resumed(root, monkeypatch):
    """An error in the middle of a shard (any file system): no shard, no summary; what a
    kill leaves (a temporary shard) is removed by the next run, whose outputs equal a clean
    run's."""
    data, out = files.join(root, "gldv2"), files.join(root, "out")
    _make_gldv2(data)
    real = records.make_example
    calls = []

    def failing(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        return real(**kw)

    monkeypatch.setattr(records, "make_example", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        gldv2.convert_gldv2(data, out, num_shards=2, beam_args=IN_MEMORY)
    monkeypatch.undo()
    assert not files.exists(files.join(out, contract.CONVERTER_SUMMARY_FILE))
    assert files.glob(files.join(out, gldv2.TRAIN_PATTERN)) == []
    leftover = files.join(out, gldv2.shard_name("train", 1, 2)) + ".tmp-host-1-dead"
    files.write_bytes_atomic(leftover, b"half a shard")  # what a SIGKILL leaves

    summary = gldv2.convert_gldv2(data, out, num_shards=2, beam_args=IN_MEMORY)
    assert summary.total_written == 6 and not files.exists(leftover)
    clean = files.join(root, "clean")
    gldv2.convert_gldv2(data, clean, num_shards=2, beam_args=IN_MEMORY)
    assert _outputs(out) == _outputs(clean)


# ---------------------------------------------------------------------------- export


def test_export_killed_by_sigkill_leaves_no_version_and_is_cleaned(tmp_path):
    base = str(tmp_path / "export")
    driver = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS_DIR!r})
        from glam_tf import files
        from glam_tf.export import export_saved_model
        from keras_helpers import tiny_keras_model
        real = files.write_text_atomic
        def kill_after_saving(path, text):  # the SavedModel is written, not yet published
            print("mid-export", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        files.write_text_atomic = kill_after_saving
        export_saved_model(tiny_keras_model(), {base!r}, scales=(1.0,), max_image_size=32)
    """)
    proc = subprocess.run([sys.executable, "-c", driver], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and "mid-export" in proc.stdout, proc.stderr
    left = files.listdir(base)
    assert len(left) == 1 and left[0].startswith(".tmp-1-"), left
    with pytest.raises(FileNotFoundError, match="is not a SavedModel"):
        contract.resolve_saved_model_dir(base)  # TF Serving polls numbers only: none here

    path = export_saved_model(tiny_keras_model(), base, scales=(1.0,), max_image_size=32)
    assert files.listdir(base) == ["1"] and path == files.join(base, "1")


def test_export_interrupted_while_publishing_is_never_loaded_and_is_cleaned(root, monkeypatch):
    """`ram://` publishes a version by copying its files, `saved_model.pb` last (as on an
    object store): stopped half-way, the numbered folder has no saved_model.pb, readers
    refuse it, and the next export removes it and writes the version whole."""
    base = files.join(root, "export")
    model = tiny_keras_model()
    real_copy, copied = files.copy, []

    def stop_half_way(src, dst):
        if len(copied) == 2:
            raise KeyboardInterrupt("stopped while publishing")
        copied.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(files, "copy", stop_half_way)
    if files.is_local(base):
        monkeypatch.setattr(files, "is_local", lambda p: False)  # take the copy branch
    with pytest.raises(KeyboardInterrupt):
        export_saved_model(model, base, scales=(1.0,), max_image_size=64)
    monkeypatch.undo()
    assert copied and not any(c.endswith("saved_model.pb") for c in copied)
    assert "1" in files.listdir(base)
    assert not files.exists(files.join(base, "1", "saved_model.pb"))
    with pytest.raises(FileNotFoundError, match="is not a SavedModel"):
        contract.resolve_saved_model_dir(base)

    if files.is_local(base):  # locally a numbered folder is published by one rename
        assert serving.remove_unfinished_versions(base) == []
        files.rmtree(files.join(base, "1"))
    path = export_saved_model(model, base, scales=(1.0,), max_image_size=64)
    assert path == files.join(base, "1") and files.listdir(base) == ["1"]
    loaded = tf.saved_model.load(contract.resolve_saved_model_dir(base))
    image = tf.cast(tf.random.stateless_uniform((48, 64, 3), (3, 4), 0, 255), tf.uint8)
    desc = loaded.signatures["global_descriptor"](input_image=image)["global_descriptor"]
    np.testing.assert_allclose(np.linalg.norm(desc.numpy()), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_leftovers_of_a_killed_save_are_removed_on_resume(root):
    """The `checkpoint` state file is written last: TensorFlow's temporaries of a save
    killed before it (`ckpt-N_temp/`, `checkpoint.tmp<hex>`) are not a checkpoint; the
    resumed run restores the listed one and removes them."""
    config = tiny_train_config(files.join(root, "run"), train_steps=3, checkpoint_every=3)
    train(config, model_fn=tiny_descriptor_model)
    ckpt_dir = contract.checkpoints_dir(config.train_dir)
    listed = tf.train.latest_checkpoint(ckpt_dir)
    assert listed == files.join(ckpt_dir, "ckpt-3")
    leftovers = [files.join(ckpt_dir, "ckpt-5_temp", "part-00000-of-00001.index"),
                 files.join(ckpt_dir, "checkpoint.tmp0123abcd")]
    for path in leftovers:
        files.makedirs(files.dirname(path))
        files.write_bytes_atomic(path, b"half")
    assert tf.train.latest_checkpoint(ckpt_dir) == listed  # readers go by the state file

    import dataclasses  # noqa: PLC0415

    result = train(dataclasses.replace(config, train_steps=4), model_fn=tiny_descriptor_model)
    assert (result.start_step, result.final_step) == (3, 4)
    names = files.listdir(ckpt_dir)
    assert not any(n.startswith(("ckpt-5", "checkpoint.tmp")) for n in names), names
    assert tf.train.latest_checkpoint(ckpt_dir) == files.join(ckpt_dir, "ckpt-4")


def test_remove_unfinished_checkpoints_keeps_checkpoint_files(root):
    ckpt_dir = files.join(root, "ckpts")
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=3,
                                         checkpoint_name=checkpointing.CHECKPOINT_NAME)
    manager.save(checkpoint_number=2)
    files.write_bytes_atomic(files.join(ckpt_dir, "ckpt-1.index"), b"older, unlisted")
    files.makedirs(files.join(ckpt_dir, "ckpt-9_temp"))
    files.write_bytes_atomic(files.join(ckpt_dir, "ckpt-9_temp", "part-00000-of-00001"), b"x")
    files.write_bytes_atomic(files.join(ckpt_dir, "checkpoint.tmpfeed"), b"half")
    removed = checkpointing.remove_unfinished_checkpoints(manager)
    assert sorted(files.basename(p) for p in removed) == ["checkpoint.tmpfeed", "ckpt-9_temp"]
    assert files.listdir(ckpt_dir) == [
        "checkpoint", "ckpt-1.index", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
