"""Damaged TFRecord shards: the framing scanner, the refusal that names them, and the
`skip_damaged_records` mode that reads every recoverable record and counts what it left out.

Each damage case cuts, flips or appends bytes in shard "b" (shard "a" stays intact) and
knows which records survive: those before the damage and, after a resync, those after it.
"""

import glob
import io
import json
import os
import re
import struct
import subprocess
import sys
import typing

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf import files as glam_files
from glam_tf.config import DataConfig
from glam_tf.data import framing, pipeline, records
from glam_tf.model import ModelConfig
from glam_tf.train import TrainConfig, train
from glam_tf.train.reporting import read_scalars
from keras_helpers import DRIVER, tiny_descriptor_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_A, NUM_B = 4, 8  # records per shard
IDS_A = [f"a{k:015d}" for k in range(NUM_A)]
IDS_B = [f"b{k:015d}" for k in range(NUM_B)]


def _example(image_id: str, label: int) -> bytes:
    rng = np.random.default_rng(int(image_id[1:]) + (100 if image_id[0] == "b" else 0))
    pixels = (rng.random((24 + 4 * (label % 3), 32, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    info = records.ImageInfo(height=pixels.shape[0], width=32, channels=3, format="jpeg")
    return records.make_example(encoded=buf.getvalue(), image_id=image_id, label=label,
                                info=info).SerializeToString()


def _write(path, ids):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for k, image_id in enumerate(ids):
            writer.write(_example(image_id, k % 3))


def _offsets(data: bytes) -> list:
    """Start offsets of the records of an intact TFRecord file, then its size."""
    offsets = [0]
    while offsets[-1] < len(data):
        (length,) = struct.unpack_from("<Q", data, offsets[-1])
        offsets.append(offsets[-1] + 16 + length)
    return offsets


def _crc(data: bytes) -> int:  # the masked CRC, independent of glam_tf's (google's check)
    return framing.mask(framing.crc32c_update(0, data))


def _huge_length(data, o):
    head = struct.pack("<Q", 1 << 62)
    return data[:o[3]] + head + struct.pack("<I", _crc(head)) + data[o[3] + 12:]


def _flip(data, position):
    return data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1:]


class Case(typing.NamedTuple):
    """A damage to shard b and what must come of it."""

    damage: typing.Callable  # (intact bytes, record offsets) -> damaged bytes
    survivors: list  # ids of b read in skip mode
    problem: str  # regex of the reported problem
    span: typing.Callable  # (record offsets, damaged size) -> (start, end) of the lost span
    lost: typing.Optional[int]  # records known lost (None: hidden by a damaged header)


CASES = {
    "cut_mid_record": Case(lambda d, o: d[:o[5] + 40], IDS_B[:5],
                           r"record length \d+ runs past end of file \(size \d+\)",
                           lambda o, size: (o[5], size), None),
    "cut_mid_header": Case(lambda d, o: d[:o[5] + 5], IDS_B[:5],
                           r"truncated inside record header \(5 bytes at the end of the file\)",
                           lambda o, size: (o[5], size), None),
    "flipped_payload_byte": Case(lambda d, o: _flip(d, o[2] + 12 + 30), IDS_B[:2] + IDS_B[3:],
                                 r"data CRC mismatch", lambda o, size: (o[2], o[3]), 1),
    "flipped_length_byte": Case(lambda d, o: _flip(d, o[2] + 1), IDS_B[:2] + IDS_B[3:],
                                r"length CRC mismatch", lambda o, size: (o[2], o[3]), None),
    "huge_length_valid_crc": Case(_huge_length, IDS_B[:3] + IDS_B[4:],
                                  rf"record length {1 << 62} runs past end of file",
                                  lambda o, size: (o[3], o[4]), None),
    "zeroed_block": Case(lambda d, o: d[:o[2] + 5] + bytes(o[5] + 15 - o[2]) + d[o[5] + 20:],
                         IDS_B[:2] + IDS_B[6:], r"length CRC mismatch",
                         lambda o, size: (o[2], o[6]), None),
    "garbage_appended": Case(lambda d, o: d + np.random.default_rng(0).bytes(100), IDS_B,
                             r"length CRC mismatch; no valid record follows \(trailing garbage",
                             lambda o, size: (o[-1], size), None),
    "not_a_tfrecord": Case(lambda d, o: b"\xff\xd8\xff\xe0 a JPEG, not a TFRecord " * 20, [],
                           r"not a TFRecord file \(no valid record in its \d+ bytes\)",
                           lambda o, size: (0, size), None),
}


@pytest.fixture
def shards(tmp_path, request):
    """(pattern, path of b, record offsets of intact b, its Case), b damaged as it says."""
    name = request.param
    _write(tmp_path / "train-a.tfrecord", IDS_A)
    path_b = tmp_path / "train-b.tfrecord"
    _write(path_b, IDS_B)
    data = path_b.read_bytes()
    offsets = _offsets(data)
    path_b.write_bytes(CASES[name].damage(data, offsets))
    return str(tmp_path / "train-*.tfrecord"), str(path_b), offsets, CASES[name]


def _config(pattern, **kw):
    return DataConfig(file_pattern=pattern, global_batch_size=2,
                                     size_scale=1 / 16, shuffle_buffer=4, deterministic=True,
                                     **kw)


def test_crc32c_and_mask_match_known_values(tmp_path):
    assert framing.crc32c_update(0, b"123456789") == 0xE3069283  # the CRC-32C check value
    assert framing.crc32c_update(framing.crc32c_update(0, b"12345"), b"6789") == 0xE3069283
    # Written by TensorFlow: the length CRC of an empty record.
    path = tmp_path / "empty.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(b"")
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, 8)[0] == framing.mask(
        framing.crc32c_update(0, bytes(8)))


def test_intact_shard_scans_clean(tmp_path):
    _write(tmp_path / "a.tfrecord", IDS_A)
    size = os.path.getsize(tmp_path / "a.tfrecord")
    for check_data in (False, True):
        report = framing.scan_shard(str(tmp_path / "a.tfrecord"), check_data=check_data)
        assert report.ok and report.records == NUM_A and report.spans == ((0, size),)
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    assert framing.scan_shard(str(tmp_path / "empty.tfrecord")).records == 0
    assert pipeline.count_records(str(tmp_path / "*.tfrecord")) == NUM_A


@pytest.mark.parametrize("shards", list(CASES), indirect=True)
def test_scanner_names_the_damaged_span(shards):
    _, path_b, offsets, case = shards
    size = os.path.getsize(path_b)
    report = framing.scan_shard(path_b, check_data=True)
    assert report.records == len(case.survivors)
    assert len(report.damage) == 1, report.describe()
    (damage,) = report.damage
    assert (damage.offset, damage.end) == case.span(offsets, size)
    assert damage.records == case.lost
    assert report.damaged_bytes + sum(e - s for s, e in report.spans) == size
    assert f"{path_b}: offset {damage.offset}: " in report.describe()
    assert re.match(case.problem, damage.problem), damage.problem


@pytest.mark.parametrize("shards", list(CASES), indirect=True)
def test_default_refuses_naming_file_offset_and_problem(shards):
    pattern, path_b, offsets, case = shards
    start, _ = case.span(offsets, os.path.getsize(path_b))
    for build in (lambda: pipeline.build_train_dataset(_config(pattern)),
                  lambda: pipeline.count_records(pattern)):
        with pytest.raises(pipeline.DamagedShardsError) as info:
            build()
        message = str(info.value)
        assert f"{path_b}: offset {start}: " in message
        assert re.search(case.problem, message), message
        assert "train-a.tfrecord" not in message  # only the damaged shard is listed


@pytest.mark.parametrize("shards", list(CASES), indirect=True)
def test_skip_mode_reads_every_recoverable_record(shards, tmp_path):
    pattern, path_b, offsets, case = shards
    start, end = case.span(offsets, os.path.getsize(path_b))
    stats = pipeline.DecodeStats()
    reports = pipeline.check_shards(sorted(tf.io.gfile.glob(pattern)))
    files = pipeline.readable_files(reports, skip_damaged=True,
                                    clean_dir=str(tmp_path / "clean"))
    assert files[0] == reports[0].path and files[1].startswith(str(tmp_path / "clean"))
    stats.record_damage(reports)
    ds = pipeline.build_train_dataset(_config(pattern, skip_damaged_records=True),
                                      repeat=False, with_ids=True, files=files, stats=stats)
    ids = sorted(i.decode() for _, _, batch in ds for i in batch.numpy())
    assert ids == sorted(IDS_A + case.survivors)
    counts = stats.result()
    assert (counts["damaged_spans"], counts["damaged_bytes"]) == (1, end - start)
    assert counts["damaged_records"] == (case.lost or 0)
    assert counts["dropped"] == 0
    # The clean copy is an intact shard; a rerun reuses it.
    assert framing.scan_shard(files[1]).ok
    assert pipeline.readable_files(reports, skip_damaged=True,
                                   clean_dir=str(tmp_path / "clean")) == files
    assert pipeline.count_records(pattern, skip_damaged=True) == NUM_A + len(case.survivors)


@pytest.mark.parametrize("shards", ["flipped_length_byte"], indirect=True)
def test_build_without_files_checks_and_skips(shards):
    pattern, _, _, case = shards
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(_config(pattern, skip_damaged_records=True),
                                      repeat=False, with_ids=True, stats=stats)
    assert sorted(i.decode() for _, _, b in ds for i in b.numpy()) == sorted(
        IDS_A + case.survivors)
    assert stats.result()["damaged_spans"] == 1


def _train_config(train_dir, pattern, train_steps=3, **kw):
    return TrainConfig(
        train_dir=str(train_dir), data_source="tfrecord",
        model=ModelConfig(backbone="resnet50", weights="none", reduced_channels=8,
                          embedding_dim=16),
        data=_config(pattern, **kw), optimizer="sgd", learning_rate=0.01, train_steps=train_steps,
        checkpoint_every=3, log_every=1, summary_every=1, export=False)


@pytest.mark.parametrize("shards", ["flipped_payload_byte"], indirect=True)
def test_training_refuses_before_the_model_or_skips_and_reports(shards, tmp_path):
    pattern, path_b, offsets, _ = shards
    built = []

    def model_fn(config):
        built.append(tiny_descriptor_model(config))
        return built[-1]

    with pytest.raises(pipeline.DamagedShardsError,
                       match=rf"{path_b}: offset {offsets[2]}: data CRC mismatch(.|\n)*"
                             r"--skip_damaged_records"):
        train(_train_config(tmp_path / "refused", pattern), model_fn=model_fn)
    assert not built  # refused before any model was built
    run = tmp_path / "run"
    result = train(_train_config(run, pattern, skip_damaged_records=True), model_fn=model_fn)
    assert result.final_step == 3
    scalars = read_scalars(str(run / "tensorboard"))
    assert scalars["data/damaged_spans_skipped"][3] == 1
    assert scalars["data/damaged_records_skipped"][3] == 1
    assert scalars["data/damaged_bytes_skipped"][3] == offsets[3] - offsets[2]
    reader = tf.train.load_checkpoint(str(run / "checkpoints" / "ckpt-3"))
    saved = {k.split("/")[1]: reader.get_tensor(k)
             for k in reader.get_variable_to_dtype_map() if k.startswith("data_stats/")}
    assert saved["damaged_spans"] == 1 and saved["damaged_records"] == 1
    assert os.listdir(run / "data_check")  # the clean copy of shard b
    # A restart checks again, reuses the clean copy and restores the iterator over it.
    again = train(_train_config(run, pattern, skip_damaged_records=True, train_steps=5),
                  model_fn=model_fn)
    assert (again.start_step, again.final_step) == (3, 5)
    assert read_scalars(str(run / "tensorboard"))["data/damaged_spans_skipped"][5] == 1
    assert len(list((run / "data_check").glob("*.clean"))) == 1
    # Only the intact shard a is in the record of verified shards.
    assert list(pipeline.load_verified(str(run / "data_check"))) == [
        os.path.abspath(pattern.replace("*", "a"))]


@pytest.mark.parametrize("shards", ["huge_length_valid_crc"], indirect=True)
def test_cli_huge_length_never_crashes(shards, tmp_path):
    """An absurd length with a valid CRC once crashed TensorFlow's reader (SIGSEGV)."""
    pattern, path_b, offsets, _ = shards
    args = [f"--train_file_pattern={pattern}", "--data_source=tfrecord", "--train_steps=2",
            "--global_batch_size=2", "--size_scale=0.0625", "--weights=none",
            "--backbone=resnet50", "--noexport", "--checkpoint_every=2"]

    def run(*extra):
        return subprocess.run(
            ["timeout", "-k", "5", "240", sys.executable, "-c", DRIVER, *args, *extra],
            cwd=REPO, capture_output=True, text=True)

    refused = run(f"--train_dir={tmp_path / 'refused'}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"{path_b}: offset {offsets[3]}: record length {1 << 62} runs past end of file"
            in refused.stderr)
    assert "--skip_damaged_records" in refused.stderr
    assert "Synchronized" not in refused.stderr  # the model was never built
    skipped = run(f"--train_dir={tmp_path / 'run'}", "--skip_damaged_records")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert '"final_step": 2' in skipped.stdout
    assert f"Skipping damaged TFRecord span: {path_b}: offset {offsets[3]}" in skipped.stderr


def _counting_data_pass(monkeypatch):
    """Replaces the TF data pass with a wrapper that lists the shards it reads."""
    read, real = [], pipeline._tf_data_ok

    def data_pass(path):
        read.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(pipeline, "_tf_data_ok", data_pass)
    return read


def test_record_of_verified_shards_skips_the_data_pass(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "train-a.tfrecord", IDS_A)
    _write(data / "train-b.tfrecord", IDS_B)
    files = sorted(str(p) for p in data.glob("train-*.tfrecord"))
    check = tmp_path / "data_check"
    read = _counting_data_pass(monkeypatch)
    written = []
    real_write = glam_files.write_json_atomic
    monkeypatch.setattr(glam_files, "write_json_atomic",
                        lambda path, obj: (written.append(path), real_write(path, obj)))

    assert all(r.ok for r in pipeline.check_shards(files, record_dir=str(check)))
    assert read == ["train-a.tfrecord", "train-b.tfrecord"]
    record = pipeline.record_path(str(check))
    assert written == [record]  # through the crash-safe writer, once
    assert sorted(os.listdir(check)) == [os.path.basename(record)]  # no temporary file left
    with open(record, encoding="utf-8") as f:
        shards = json.load(f)["shards"]
    assert shards == {os.path.abspath(p): {"size": os.stat(p).st_size,
                                           "mtime_ns": os.stat(p).st_mtime_ns}
                      for p in files}

    # A second start reads no data: both shards are known; nothing is rewritten.
    read.clear()
    reports = pipeline.check_shards(files, record_dir=str(check))
    assert read == [] and written == [record]
    assert [r.records for r in reports] == [NUM_A, NUM_B] and all(r.ok for r in reports)

    # Without a record folder every shard is read, and nothing is recorded.
    pipeline.check_shards(files)
    assert read == ["train-a.tfrecord", "train-b.tfrecord"]

    # Shard b changes after it was recorded (a flipped payload byte, a new mtime): it is
    # verified again and found damaged, and leaves the record; a stays known.
    read.clear()
    path_b = files[1]
    raw = open(path_b, "rb").read()
    offsets = _offsets(raw)
    stat = os.stat(path_b)
    with open(path_b, "wb") as f:
        f.write(_flip(raw, offsets[2] + 12 + 30))
    os.utime(path_b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reports = pipeline.check_shards(files, record_dir=str(check))
    assert read == ["train-b.tfrecord"]
    assert reports[0].ok and not reports[1].ok
    assert re.search(r"data CRC mismatch", reports[1].describe())
    assert list(pipeline.load_verified(str(check))) == [os.path.abspath(files[0])]
    with pytest.raises(pipeline.DamagedShardsError, match="data CRC mismatch"):
        pipeline.readable_files(reports, skip_damaged=False)

    # A truncated shard changes size: verified again (its framing already says so).
    read.clear()
    with open(files[0], "r+b") as f:
        f.truncate(os.stat(files[0]).st_size - 7)
    assert not pipeline.check_shards(files, record_dir=str(check))[0].ok


def test_unreadable_record_is_ignored_and_workers_split_the_data_pass(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for k in range(4):
        _write(data / f"train-{k}.tfrecord", IDS_A)
    files = sorted(str(p) for p in data.glob("train-*.tfrecord"))
    check = tmp_path / "data_check"
    check.mkdir()
    (check / "verified_shards-worker1.json").write_text("{half a fi")
    read = _counting_data_pass(monkeypatch)

    from glam_tf.train.data import data_verified_here  # noqa: PLC0415
    from glam_tf.train.distribute import WorkerInfo  # noqa: PLC0415

    def worker(k, n=2):
        return WorkerInfo(num_workers=n, worker_index=k, is_chief=k == 0, num_replicas=n,
                          local_replicas=1)

    config = _config(str(data / "train-*.tfrecord"))
    assert data_verified_here(files, worker(0, 1), config) is None
    assert data_verified_here(files[:1], worker(1), config) is None  # records are split
    assert data_verified_here(
        files, worker(1), _config(config.file_pattern, skip_damaged_records=True)) is None
    for k in (0, 1):  # each worker reads the data of the files its pipeline reads
        share = data_verified_here(files, worker(k), config)
        assert share == files[k::2]
        reports = pipeline.check_shards(files, record_dir=str(check), verify=share,
                                        worker_index=k)
        assert all(r.ok and r.records == NUM_A for r in reports)  # framing of all
        assert read == [os.path.basename(p) for p in share]
        read.clear()
    # Each worker wrote its own record file; together they know every shard.
    assert sorted(glob.glob(str(check / "verified_shards-*.json"))) == [
        str(check / "verified_shards-worker0.json"), str(check / "verified_shards-worker1.json")]
    assert sorted(pipeline.load_verified(str(check))) == [os.path.abspath(p) for p in files]
    pipeline.check_shards(files, record_dir=str(check))  # one worker now: nothing to read
    assert read == []


def test_atomic_write_temporary_names_are_unique_and_cleaned(tmp_path, monkeypatch):
    names = []
    real_open = glam_files.open_file

    def spy_open(path, *args, **kw):
        names.append(str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(glam_files, "open_file", spy_open)
    target = tmp_path / "out.json"
    glam_files.write_json_atomic(str(target), {"a": 1})
    glam_files.write_json_atomic(str(target), {"a": 2})
    monkeypatch.undo()
    assert len(set(names)) == 2 and all(
        n.startswith(f"{target}.tmp-{__import__('socket').gethostname()}-{os.getpid()}-")
        for n in names)
    assert json.loads(target.read_text()) == {"a": 2}

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        glam_files.atomic_write(str(target), fails)
    assert os.listdir(tmp_path) == ["out.json"] and json.loads(target.read_text()) == {"a": 2}
