"""One exit-status contract for every program (glam_tf.refusal.run): a flag that does not
parse, a weights file refused and training records that cannot be trained on are one line
`<program>: error: ...` on stderr and exit status 2, with no traceback unless
--verbosity=1; a mistyped or unreachable path is one `refused` line and status 3.

Each case runs through the command line (one subprocess each). Flag errors fail before
TensorFlow is imported; the data cases run train_main with the small stand-in model
(keras_helpers.DRIVER), the weights case the real one (the file is refused before the
backbone is built).
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf import files
from glam_tf.data import records
from glam_tf.refusal import EXIT_REFUSED, EXIT_USAGE, PIPELINE_PREFIX, bad_input
from keras_helpers import DRIVER

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = ["--data_source=tfrecord", "--train_steps=2", "--global_batch_size=2",
        "--size_scale=0.0625", "--weights=none", "--backbone=resnet50", "--noexport",
        "--checkpoint_every=2"]
TINY_RANDOM = ["--data_source=random", "--num_classes=4", "--random_image_size=32,32",
               "--global_batch_size=2", "--train_steps=1", "--export=false",
               "--backbone=resnet50", "--reduced_channels=8", "--embedding_dim=16"]


def _example(image_id: str, label: int, encoded: bytes = b"") -> bytes:
    if not encoded:
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(buf, "JPEG")
        encoded = buf.getvalue()
    info = records.ImageInfo(height=24, width=32, channels=3, format="jpeg")
    return records.make_example(encoded=encoded, image_id=image_id, label=label,
                                info=info).SerializeToString()


def _shard(folder: pathlib.Path, examples, summary=None) -> str:
    folder.mkdir()
    with tf.io.TFRecordWriter(str(folder / "train-00000-of-00001.tfrecord")) as writer:
        for example in examples:
            writer.write(example)
    if summary is not None:  # what build_gldv2_main writes beside its shards
        (folder / "summary.json").write_text(json.dumps(
            {"train_pattern": "train-*-of-*.tfrecord", **summary}))
    return str(folder / "train-*-of-*.tfrecord")


def _run(args, *, program="train_main", driver=False, timeout=240):
    command = ([sys.executable, "-c", DRIVER] if driver
               else [sys.executable, f"{program}.py"])
    return subprocess.run([*command, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _assert_one_line(res, program, code, *fragments):
    lines = [line for line in res.stderr.splitlines() if line.startswith(f"{program}: ")]
    assert res.returncode == code, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _soft_link_weights(path: pathlib.Path) -> pathlib.Path:
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv1_conv"])
        group = f.create_group("conv1_conv")
        group.attrs["weight_names"] = np.array([b"bias:0"])
        group["bias:0"] = h5py.SoftLink("/etc/passwd")
    return path


FLAG_CASES = {
    "unparsable-int": (["--train_steps=abc"], "train_main",
                       "flag --train_steps=abc: invalid literal for int()"),
    "bad-enum": (["--variant=bogus"], "train_main", "flag --variant=bogus: value should be"),
    "missing-flagfile": (["--flagfile={tmp}/none.flags"], "eval_main",
                         "Unable to open flagfile"),
    "directory-flagfile": (["--flagfile={tmp}"], "train_main", "Is a directory"),
    "required-flag": (["--output_dir={tmp}/out"], "build_gldv2_main",
                      "flag --gldv2_root=None: Flag --gldv2_root must have a value"),
    "positional": (["extra"], "make_synthetic_main", "unexpected arguments: ['extra']"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flag_errors_are_one_line_and_status_2(case, tmp_path):
    args, program, fragment = FLAG_CASES[case]
    res = _run([a.format(tmp=tmp_path) for a in args], program=program, timeout=120)
    _assert_one_line(res, program, EXIT_USAGE, f"{program}: error: ", fragment)
    assert "tensorflow" not in res.stderr.lower()  # failed before TensorFlow was loaded


def test_refused_weights_file_is_status_2(tmp_path):
    weights = _soft_link_weights(tmp_path / "linked.h5")
    res = _run([f"--train_dir={tmp_path / 'run'}", *TINY_RANDOM, f"--weights={weights}"])
    _assert_one_line(res, "train_main", EXIT_USAGE, f"--weights={str(weights)!r}",
                     "'/conv1_conv/bias:0' is a soft link (to '/etc/passwd')")


@pytest.mark.parametrize("case", ["empty", "labels-scanned", "labels-in-pipeline"])
def test_training_records_that_cannot_be_trained_on(case, tmp_path):
    extra = []
    if case == "empty":
        pattern = _shard(tmp_path / "shards", [])
        expected = ("hold no record to train on",)
    elif case == "labels-scanned":  # no converter summary: the labels are scanned first
        pattern = _shard(tmp_path / "shards", [_example("a", 0), _example("b", 1),
                                               _example("wrong", 7)])
        extra = ["--num_classes=2"]
        expected = ("have a label outside [0, 2); the first: record 2 of",
                    "train-00000-of-00001.tfrecord (label 7)")
    else:  # a summary that says 2 classes: the labels are found by the input pipeline
        pattern = _shard(tmp_path / "shards", [_example(f"wrong{k}", 7) for k in range(4)],
                         summary={"written": {"train": 4}, "num_classes": 2})
        expected = ("train_main: error: training records: record id= wrong",
                    "has label 7 outside [0, 2) (the number of classes); fix the records")
    res = _run([f"--train_dir={tmp_path / 'run'}", f"--train_file_pattern={pattern}",
                *DATA, *extra], driver=True)
    _assert_one_line(res, "train_main", EXIT_USAGE, *expected)
    if case != "labels-in-pipeline":  # refused before the model is built
        assert "Synchronized" not in res.stderr, res.stderr[-3000:]


def test_pipeline_errors_become_their_sentence():
    """What tf.data raises for a failed tf.debugging.Assert of the input pipeline (here the
    undecodable-run check's wording) is one line without TensorFlow's graph context."""
    def check(x):
        assert_op = tf.debugging.Assert(x < 2, [PIPELINE_PREFIX, x, "records in a row could "
                                                "not be decoded (the last: id=", b"bad2", ")"])
        with tf.control_dependencies([assert_op]):
            return tf.identity(x)

    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(tf.data.Dataset.range(4).map(check))
    assert bad_input(e.value) == ("training records: 2 records in a row could not be decoded "
                                  "(the last: id= bad2 )")
    assert bad_input(ValueError("a bug")) is None


# One wording and status per kind of path that cannot be used, whatever the program.
PATH_FLAGS = {
    "train_main": ["--train_dir={path}", "--data_source=random", "--num_classes=4"],
    "eval_main": ["--dataset=synth", "--data_root={path}", "--model={tmp}",
                  "--output_dir={tmp}/out"],
    "export_main": ["--train_dir={path}", "--export_dir={tmp}/export"],
    "build_gldv2_main": ["--gldv2_root={path}", "--output_dir={tmp}/out"],
    "make_synthetic_main": ["--root={path}"],
    "download_main": ["--output_dir={path}", "--datasets=roxford5k"],
    "build_index_main": ["--index_dir={path}", "--export_dir={tmp}"],
}


@pytest.mark.parametrize("program", sorted(PATH_FLAGS))
def test_a_scheme_without_a_url_is_refused_by_every_program(program, tmp_path):
    args = [a.format(path="gs:/bucket/x", tmp=tmp_path) for a in PATH_FLAGS[program]]
    res = _run(args, program=program, timeout=120)
    flag = args[0 if program != "eval_main" else 1].split("=")[0]
    _assert_one_line(res, program, EXIT_REFUSED,
                     f"{program}: refused: gs:/bucket/x: {flag}: starts like a URL (gs:) but "
                     "is not one (a URL is gs://<bucket>/<path>); write gs://... for that "
                     "store, or ./gs:/bucket/x for a local folder of that name")
    assert not (REPO / "gs:").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, fragment", [
    ("file://{tmp}/set", "--root: file:// URLs are not taken; give the local path itself "
                         "({tmp}/set)"),
    ("{tmp}/missing/../set", "--root: goes through {tmp}/missing, which is not an existing "
                             "folder, before '..'; give the path without that step "
                             "({tmp}/set)"),
], ids=["file-url", "missing-parent"])
def test_file_urls_and_steps_through_missing_folders(path, fragment, tmp_path):
    res = _run([f"--root={path.format(tmp=tmp_path)}"], program="make_synthetic_main",
               timeout=120)
    _assert_one_line(res, "make_synthetic_main", EXIT_REFUSED,
                     fragment.format(tmp=tmp_path))
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """`missing/../x`: the system refuses the rename, TensorFlow wrote the temporary file
    under the shortened name; it is removed all the same."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        files.write_bytes_atomic("missing/../out/file.bin", b"data")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("verbosity", [0, 1])
def test_the_traceback_comes_only_with_verbosity_1(verbosity):
    driver = ("from glam_tf import refusal\n"
              "def main(argv):\n"
              "    raise refusal.BadInput('shard.tfrecord: record 3: no image')\n"
              "refusal.run(main, 'prog')\n")
    res = subprocess.run([sys.executable, "-c", driver, f"--verbosity={verbosity}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == EXIT_USAGE
    assert res.stderr.splitlines()[-1] == "prog: error: shard.tfrecord: record 3: no image"
    assert ("Traceback (most recent call last)" in res.stderr) == bool(verbosity)
