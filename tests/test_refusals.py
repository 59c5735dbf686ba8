"""One line per refusal: every program, pointed at a path it cannot use, prints one line
naming the path and what to do and exits with refusal.EXIT_REFUSED (3), not a traceback
(exit 1); the traceback comes with --verbosity=1.

Through the command line (subprocess), each case refusing before heavy work where it can.
A full disk is an injected OSError(ENOSPC) (or TensorFlow's RESOURCE_EXHAUSTED, what its
C++ writers raise for ENOSPC) in a `python -c` driver around the real program; a read-only
folder is `chattr +i` as root, mode 0555 otherwise.
"""

import errno
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from glam_tf import refusal
from helpers import TESTS_DIR, write_tiny_revisited

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--data_source=random", "--num_classes=4", "--random_image_size=32,48",
              "--global_batch_size=4", "--train_steps=4", "--checkpoint_every=2",
              "--export=false", "--backbone=resnet50", "--weights=none",
              "--reduced_channels=8", "--embedding_dim=16"]


def _driver(module, patch, parser):
    """`python -c` source: `patch`, then the real `module.main` under absl's app.run."""
    return (f"import errno, os, sys\nsys.path.insert(0, {TESTS_DIR!r})\n"
            f"from absl import app\nfrom glam_tf import beam_options\n"
            f"import {module} as program\n{patch}\n"
            f"app.run(program.main{parser})\n")


def _run(program, args, patch=None, timeout=240, parser=""):
    command = ([sys.executable, "-c", _driver(program, patch, parser)] if patch
               else [sys.executable, f"{program}.py"])
    res = subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    lines = [line for line in res.stderr.splitlines() if line.startswith(f"{program}: ")]
    return res, lines


def _assert_refused(res, lines, program, start, *, traceback=False):
    """Exit 3, one `<program>: refused: <start>...` line, the traceback only if asked for
    (`traceback=None`: not checked: Beam logs a failed bundle's traceback itself)."""
    assert res.returncode == refusal.EXIT_REFUSED, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"{program}: refused: {start}"), lines[0]
    if traceback is not None:
        assert ("Traceback (most recent call last)" in res.stderr) == traceback
    if not traceback:
        assert lines[0].endswith("(--verbosity=1 shows the traceback)")
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through mode bits: make the folder immutable
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root where chattr +i is refused: no read-only folder")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_train_dir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a folder")
    res, lines = _run("train_main", [f"--train_dir={path}", *TINY_TRAIN])
    line = _assert_refused(res, lines, "train_main", f"{path}: --train_dir is a file")
    assert "give a directory" in line
    assert path.read_text() == "not a folder"


def test_read_only_train_dir_and_export_dir(tmp_path, read_only_dir):
    run = read_only_dir / "run"
    res, lines = _run("train_main", [f"--train_dir={run}", *TINY_TRAIN])
    line = _assert_refused(res, lines, "train_main", f"{run}: --train_dir cannot be written (")
    assert "make it writable for this user, or choose another directory" in line
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    res, lines = _run("export_main", [f"--train_dir={train_dir}",
                                      f"--export_dir={read_only_dir}"])
    _assert_refused(res, lines, "export_main",
                    f"{read_only_dir}: --export_dir cannot be written (")
    assert not list(read_only_dir.iterdir())


def test_build_gldv2_read_only_output_dir(tmp_path, read_only_dir):
    root = tmp_path / "gldv2"
    root.mkdir()
    (root / "train_clean.csv").write_text("landmark_id,images\n")
    res, lines = _run("build_gldv2_main", [f"--gldv2_root={root}",
                                           f"--output_dir={read_only_dir / 'records'}"])
    _assert_refused(res, lines, "build_gldv2_main",
                    f"{read_only_dir / 'records'}: --output_dir cannot be written (")


def test_train_file_pattern_matching_a_directory(tmp_path):
    data = tmp_path / "records"
    (data / "train-00000-of-00002.tfrecord").mkdir(parents=True)
    (data / "train-00001-of-00002.tfrecord").write_bytes(b"")
    pattern = data / "train-*"
    res, lines = _run("train_main", [f"--train_dir={tmp_path / 'run'}", *TINY_TRAIN,
                                     "--data_source=tfrecord", f"--train_file_pattern={pattern}"])
    line = _assert_refused(res, lines, "train_main",
                           f"{data / 'train-00000-of-00002.tfrecord'}: --train_file_pattern=")
    assert "matches this directory (1 of its 2 matches are directories)" in line
    assert "make the pattern match the TFRecord files only" in line


def test_full_disk_during_training_with_the_traceback_behind_verbosity(tmp_path):
    # TensorFlow's checkpoint writer reports ENOSPC as RESOURCE_EXHAUSTED, naming the file.
    patch = ("import tensorflow as tf\n"
             "from keras_helpers import tiny_descriptor_model\n"
             "def full(self, checkpoint_number=None, **kwargs):\n"
             "    raise tf.errors.ResourceExhaustedError(None, None, os.path.join(\n"
             "        self.directory, f'ckpt-{checkpoint_number}_temp/part-00000-of-00001'\n"
             "        '.data-00000-of-00001.tempstate1'\n"
             "        ) + '; No space left on device')\n"
             "tf.train.CheckpointManager.save = full\n"
             "main = program.main\n"
             "program.main = lambda argv: main(argv, model_fn=tiny_descriptor_model)")
    run = tmp_path / "run"
    for verbose in (False, True):
        res, lines = _run("train_main", [f"--train_dir={run}", *TINY_TRAIN,
                                         *(["--verbosity=1"] if verbose else [])], patch)
        line = _assert_refused(res, lines, "train_main", f"{run / 'checkpoints' / 'ckpt-2_temp'}",
                               traceback=verbose)
        assert "No space left on device; free space there or choose another directory, " \
               "then rerun the same command" in line
    assert not list((run / "checkpoints").glob("ckpt-*"))


def test_full_disk_during_export(tmp_path):
    # The SavedModel write at the end of training runs out of space half-way: no version
    # folder appears, and the temporary folder is removed (the checkpoints are kept).
    patch = ("import tensorflow as tf\n"
             "from keras_helpers import tiny_descriptor_model\n"
             "def full(obj, export_dir, *args, **kwargs):\n"
             "    os.makedirs(export_dir)\n"
             "    path = os.path.join(export_dir, 'saved_model.pb')\n"
             "    with open(path, 'wb') as f:\n"
             "        f.write(b'half')\n"
             "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)\n"
             "tf.saved_model.save = full\n"
             "main = program.main\n"
             "program.main = lambda argv: main(argv, model_fn=tiny_descriptor_model)")
    run = tmp_path / "run"
    args = [a for a in TINY_TRAIN if a != "--export=false"] + ["--train_steps=1"]
    res, lines = _run("train_main", [f"--train_dir={run}", *args], patch)
    line = _assert_refused(res, lines, "train_main", str(run / "export" / ".tmp-1-"))
    assert "saved_model.pb: no space left on the device; free space there" in line
    assert not list((run / "export").iterdir())
    assert (run / "checkpoints" / "ckpt-1.index").exists()


def test_full_disk_while_generating_the_synthetic_set(tmp_path):
    # The 4th file written runs out of space half-way: atomic_write removes its temporary
    # file, so no file is left incomplete under a final name.
    patch = ("from glam_tf import files\n"
             "real, count = files.atomic_write, [0]\n"
             "def full(path, write):\n"
             "    count[0] += 1\n"
             "    if count[0] < 4:\n"
             "        return real(path, write)\n"
             "    def half(f):\n"
             "        f.write(b'half a file')\n"
             "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)\n"
             "    real(path, half)\n"
             "files.atomic_write = full")
    root = tmp_path / "synthetic"
    res, lines = _run("make_synthetic_main", [f"--root={root}", "--num_train_landmarks=2",
                                              "--num_test_landmarks=1",
                                              "--num_distractor_landmarks=1"], patch)
    line = _assert_refused(res, lines, "make_synthetic_main", f"{root}")
    assert ": no space left on the device; free space there or choose another directory" in line
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) == 3 and not [p for p in written if ".tmp-" in p.name]
    assert all(p.read_bytes() != b"half a file" for p in written)


def test_damaged_saved_model(tmp_path):
    write_tiny_revisited(tmp_path / "data", distractors=False)
    model = tmp_path / "glam" / "1"
    model.mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"\x0a\x05trunc")
    res, lines = _run("eval_main", ["--dataset=roxford5k", f"--data_root={tmp_path / 'data'}",
                                    f"--model={tmp_path / 'glam'}",
                                    f"--output_dir={tmp_path / 'out'}"])
    line = _assert_refused(res, lines, "eval_main", f"{model}: not a loadable SavedModel (")
    assert "export it again (export_main.py) or point --model at another version" in line


def test_full_disk_while_extracting_descriptors(tmp_path):
    # The first shard runs out of space inside the Beam pipeline (relayed by Beam as a
    # RuntimeError quoting the OSError): refused, nothing left under a shard's final name.
    from glam_tf.export import export_saved_model  # noqa: PLC0415
    from helpers import MAX_SIZE, SCALES  # noqa: PLC0415
    from keras_helpers import tiny_keras_model  # noqa: PLC0415

    write_tiny_revisited(tmp_path / "data", distractors=False)
    export_saved_model(tiny_keras_model(), str(tmp_path / "glam"), version=1, scales=SCALES,
                       max_image_size=MAX_SIZE)
    patch = ("from glam_tf import files\n"
             "real = files.atomic_write\n"
             "def full(path, write):\n"
             "    if 'shard-' not in path:\n"
             "        return real(path, write)\n"
             "    def half(f):\n"
             "        f.write(b'half a shard')\n"
             "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)\n"
             "    real(path, half)\n"
             "files.atomic_write = full")
    out = tmp_path / "out"
    res, lines = _run("eval_main", ["--dataset=roxford5k", f"--data_root={tmp_path / 'data'}",
                                    f"--model={tmp_path / 'glam'}", f"--output_dir={out}",
                                    f"--max_image_size={MAX_SIZE}", "--shard_size=2",
                                    f"--scales={','.join(map(str, SCALES))}"], patch,
                        parser=", flags_parser=beam_options.parse_flags_keep_beam_args")
    line = _assert_refused(res, lines, "eval_main", str(out / "features"), traceback=None)
    assert "shard-00000.npy.tmp-" in line and ": no space left on the device; " in line
    assert not list(out.rglob("shard-*"))


# ------------------------------------------------------------------ the mechanism itself

@pytest.mark.parametrize("code, problem", [
    (errno.ENOSPC, "no space left on the device"), (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"), (errno.EISDIR, "is a directory where a file"),
    (errno.ENOTDIR, "a part of the path is a file"), (errno.EDQUOT, "disk quota exceeded")])
def test_describe_os_errors(code, problem):
    line = refusal.describe(OSError(code, os.strerror(code), "/data/x"))
    assert line.startswith(f"/data/x: {problem}") and "; " in line


def test_describe_tensorflow_errors_and_leaves_bugs_alone():
    import tensorflow as tf  # noqa: PLC0415

    error = tf.errors.ResourceExhaustedError(None, None, "/d/f.tempstate; No space left on "
                                                         "device")
    assert refusal.describe(error).startswith("/d/f.tempstate; No space left on device; "
                                              "free space there")
    assert refusal.describe(OSError(errno.EINTR, "interrupted")) is None
    assert refusal.describe(KeyError("unknown_131")) is None
    assert refusal.describe(np.linalg.LinAlgError("bug")) is None
    relayed = RuntimeError("OSError: [Errno 28] No space left on device: '/d/s.npy.tmp-1' "
                           "[while running 'Describe']")
    assert refusal.describe(relayed).startswith("/d/s.npy.tmp-1: no space left on the device")
    try:  # a refusal raised while handling another error is still found in the chain
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/x")
        except OSError as e:
            raise ValueError("wrapped") from e
    except ValueError as e:
        assert refusal.describe(e) == ("/ro/x: read-only file system; choose a writable "
                                       "directory")
    with pytest.raises(KeyError):  # a bug is not a refusal: it still crashes
        with refusal.refusals("prog"):
            raise KeyError("unknown_131")
