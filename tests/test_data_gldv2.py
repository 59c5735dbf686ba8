"""Tests of the GLDv2 reader and the Beam TFRecord converter (layout, relabelling, byte
identity with the pre-Beam converter, counters, resume, errors). The pipelines run on the
DirectRunner with 2 worker processes (the default)."""

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf.data import gldv2, records
import gldv2_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encode(mode, size, fmt="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    small = (rng.random((3, 3, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize(size, Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _put(root, image_id, data):
    path = gldv2.gldv2_image_path(os.path.join(root, "train"), image_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _make_gldv2(root, shared_data=None):
    """A tiny GLDv2 layout: 4 landmarks, mixed formats, 1 truncated, 1 garbage, 1 missing."""
    files = {}
    landmarks = {}
    k = 0
    for landmark, count in ((90017, 4), (12, 3), (5003, 5), (777, 1)):
        for j in range(count):
            image_id = f"{k:04x}" + "ab12cd34ef56"
            mode, fmt, size = [("RGB", "JPEG", (40, 30)), ("L", "JPEG", (30, 40)),
                               ("CMYK", "JPEG", (32, 32)), ("RGBA", "PNG", (36, 24))][k % 4]
            files[image_id] = _encode(mode, size, fmt, seed=k)
            landmarks[image_id] = landmark
            k += 1
    if shared_data is not None:
        real = sorted((shared_data / "oxford_query_crops").glob("*.jpg"))[:2]
        for j, path in enumerate(real):
            image_id = f"ff{j:02d}" + "00aa11bb22cc"
            files[image_id] = path.read_bytes()
            landmarks[image_id] = 12
    truncated, garbage, missing = "dead00000000beef", "dead11111111beef", "dead22222222beef"
    files[truncated] = _encode("RGB", (64, 64), seed=99)[:200]
    files[garbage] = b"<html>404 not found</html>"
    landmarks.update({truncated: 5003, garbage: 12, missing: 5003})
    for image_id, data in files.items():
        _put(root, image_id, data)
    by_landmark = {}
    for image_id, landmark in landmarks.items():
        by_landmark.setdefault(landmark, []).append(image_id)
    with open(os.path.join(root, "train_clean.csv"), "w") as f:
        f.write("landmark_id,images\n")
        for landmark, ids in by_landmark.items():
            f.write(f"{landmark},{' '.join(ids)}\n")
    return files, landmarks, (truncated, garbage, missing)


def _same_outputs(got_dir, reference_dir, shards_skipped=0):
    """Asserts two output folders hold the same bytes (output dir spelled alike; Pillow's
    message for an unidentified image names an object address, which differs per run)."""
    norm = lambda b: re.sub(rb" at 0x[0-9a-f]+>", b" at 0x?>", b)  # noqa: E731
    got = gldv2_reference.output_files(str(got_dir))
    want = gldv2_reference.output_files(str(reference_dir))
    # What the reference (older) converter did not write: the missing images' tars and the
    # tensorflow-datasets metadata.
    for name in (gldv2.MISSING_BY_TAR_NAME, "dataset_info.json", "features.json"):
        got.pop(name, None)
    summary = json.loads(got["summary.json"])
    summary.pop("missing_by_tar", None)
    got["summary.json"] = json.dumps(summary, indent=1, sort_keys=True).encode()
    want["summary.json"] = want["summary.json"].replace(
        b'"shards_skipped": 0', b'"shards_skipped": %d' % shards_skipped)
    assert sorted(got) == sorted(want)
    for name in want:
        assert norm(got[name]) == norm(want[name]), name


def _read_records(pattern):
    out = {}
    for serialized in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
        f = records.parse_example(serialized)
        out[f[records.KEY_ID].numpy().decode()] = {k: v.numpy() for k, v in f.items()}
    return out


def test_reads_both_csv_formats(tmp_path):
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n7,aaa111 bbb222\n3,ccc333\n")
    full = tmp_path / "train.csv"
    full.write_text("id,url,landmark_id\naaa111,http://x/1.jpg,7\nbbb222,http://x/2.jpg,7\n"
                    "ccc333,http://x/3.jpg,3\naaa111,http://x/1.jpg,7\n")
    expected = [gldv2.GLDv2Image("aaa111", 7), gldv2.GLDv2Image("bbb222", 7),
                gldv2.GLDv2Image("ccc333", 3)]
    assert gldv2.read_gldv2_csv(str(clean)) == expected
    assert gldv2.read_gldv2_csv(str(full)) == expected  # repeated id kept once
    assert gldv2.find_gldv2_csv(str(tmp_path)) == str(clean)  # clean preferred


@pytest.mark.parametrize("text, message", [
    ("name,images\n", "is neither 'landmark_id,images'"),
    ("landmark_id,images\nx7,aaa111\n", r":2: landmark_id 'x7' is not an integer"),
    ("landmark_id,images\n7,aaa111 ../etc\n", r":2: image id '../etc' is not a GLDv2 id"),
    ("id,url,landmark_id\naaa111,http://x\n", r":2: expected 3 columns"),
])
def test_bad_csv_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "train_clean.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        gldv2.read_gldv2_csv(str(path))


def test_missing_layout_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        gldv2.convert_gldv2(str(tmp_path), str(tmp_path / "out"))
    message = str(e.value)
    assert "train_clean.csv" in message and "train.csv" in message
    assert "train/<a>/<b>/<c>/<id>.jpg" in message
    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n1,abc123\n")
    with pytest.raises(FileNotFoundError, match=r"image folder .*train' does not exist"):
        gldv2.convert_gldv2(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"None of the 1 images .*/a/b/c/abc123\.jpg"):
        gldv2.convert_gldv2(str(tmp_path), str(tmp_path / "out"))


def test_split_per_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 2)
    train, val = gldv2.split_per_class(labels, 0.3, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(labels.size))
    # round(10 * .3) = 3, round(3 * .3) = 1, a singleton stays whole, round(.6) = 1 of 2.
    assert np.bincount(labels[val], minlength=4).tolist() == [3, 1, 0, 1]
    assert set(labels[train]) == {0, 1, 2, 3}
    again, _ = gldv2.split_per_class(labels, 0.3, seed=1)
    np.testing.assert_array_equal(train, again)


def test_convert_writes_delg_records_label_map_and_reports(tmp_path, shared_data):
    root, out = str(tmp_path / "gld"), str(tmp_path / "out")
    files, landmarks, (truncated, garbage, missing) = _make_gldv2(root, shared_data)
    summary = gldv2.convert_gldv2(root, out, num_shards=2, validation_fraction=0.2, seed=3,
                                  allow_missing=True)
    # Byte-identical to the pre-Beam converter on the same input.
    gldv2_reference.convert_reference(root, str(tmp_path / "reference"), num_shards=2,
                                      validation_fraction=0.2, seed=3)
    _same_outputs(out, tmp_path / "reference")
    good = {i for i in files if i not in (truncated, garbage)}
    assert summary.total_written == len(good)
    # Beam counters of the run equal the lists (1 missing, 2 undecodable injected).
    assert summary.counters == {"images_written": len(good), "images_missing": 1,
                                "images_undecodable": 2, "shards_written": 3}
    assert [m[0] for m in summary.missing] == [missing]
    assert sorted(u[0] for u in summary.undecodable) == sorted([truncated, garbage])
    # Labels: present landmarks in increasing id order -> 0..N-1.
    assert summary.num_classes == 4
    landmark_of_label = gldv2.read_label_map(summary.label_map_path)
    np.testing.assert_array_equal(landmark_of_label, [12, 777, 5003, 90017])
    train = _read_records(summary.train_pattern)
    val = _read_records(summary.validation_pattern)
    assert not set(train) & set(val) and set(train) | set(val) == good
    assert sorted(os.listdir(out)) == sorted([
        ".shard_reports", "conversion_plan.json", "label_map.csv", "missing_images.txt",
        "missing_by_tar.txt", "dataset_info.json", "features.json",
        "summary.json", "undecodable_images.txt", "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord", "validation-00000-of-00001.tfrecord"])
    # 20% per class of the present files: 90017 (4) -> 1, 5003 (6) -> 1, 12 (6) -> 1, 777 (1)
    # -> 0; an undecodable file drawn into validation is dropped there.
    val_landmarks = sorted(landmark_of_label[r[records.KEY_LABEL]] for r in val.values())
    assert 90017 in val_landmarks and set(val_landmarks) <= {12, 5003, 90017}
    assert len(val_landmarks) == len(set(val_landmarks))
    assert {landmark_of_label[r[records.KEY_LABEL]] for r in train.values()} == {
        12, 777, 5003, 90017}
    for image_id, r in {**train, **val}.items():
        assert r[records.KEY_ENCODED] == files[image_id]  # original bytes
        assert landmark_of_label[r[records.KEY_LABEL]] == landmarks[image_id]
        with Image.open(io.BytesIO(files[image_id])) as image:
            assert (r[records.KEY_WIDTH], r[records.KEY_HEIGHT]) == image.size
            assert r[records.KEY_CHANNELS] == len(image.getbands())
            assert r[records.KEY_FORMAT].decode() == image.format.lower()
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["written"] == {"train": len(train), "validation": len(val)}
    # The tensorflow-datasets metadata names both splits with their shard lengths.
    with open(os.path.join(out, "dataset_info.json")) as f:
        splits = {s["name"]: [int(n) for n in s["shardLengths"]] for s in json.load(f)["splits"]}
    assert splits == {"train": [len(_read_records(p)) for p in sorted(
        tf.io.gfile.glob(summary.train_pattern))], "validation": [len(val)]}
    with open(os.path.join(out, "undecodable_images.txt")) as f:
        assert sorted(line.split("\t")[0] for line in f) == sorted([truncated, garbage])
    with open(os.path.join(out, "missing_images.txt")) as f:
        assert f.read().startswith(missing + "\t")


def test_killed_conversion_resumes(tmp_path):
    """A conversion killed mid-way (shard 1 not renamed, its temp file and task left, no
    summary) resumes: finished shards are kept as they are, the rest is written, and the
    outputs equal an uninterrupted conversion's."""
    root, out = str(tmp_path / "gld"), str(tmp_path / "out")
    _make_gldv2(root)
    gldv2_reference.convert_reference(root, str(tmp_path / "reference"), num_shards=3)
    first = gldv2.convert_gldv2(root, out, num_shards=3, allow_missing=True)
    shards = sorted(tf.io.gfile.glob(first.train_pattern))
    content = {s: open(s, "rb").read() for s in shards}
    # What a kill leaves: a shard without its rename nor its report, a temp file, no summary.
    os.remove(shards[1])
    os.remove(os.path.join(out, gldv2.REPORT_DIR, os.path.basename(shards[1]) + ".json"))
    with open(shards[1] + ".tmp-host-12345-abcd", "wb") as f:
        f.write(b"partial")
    os.remove(os.path.join(out, "summary.json"))
    kept_mtime = os.stat(shards[0]).st_mtime_ns
    second = gldv2.convert_gldv2(root, out, num_shards=3, allow_missing=True)
    assert second.shards_skipped == 2
    assert second.counters["shards_written"] == 1
    assert os.stat(shards[0]).st_mtime_ns == kept_mtime
    assert {s: open(s, "rb").read() for s in shards} == content   # same bytes as before
    assert second.to_json() == {**first.to_json(), "shards_skipped": 2}
    assert not os.path.exists(shards[1] + ".tmp-host-12345-abcd")  # the kill's leftover
    _same_outputs(out, tmp_path / "reference", shards_skipped=2)
    with pytest.raises(ValueError, match="holds shards of a different conversion.*train_shards"):
        gldv2.convert_gldv2(root, out, num_shards=2, allow_missing=True)


def test_cli_equals_reference_and_passes_beam_flags(tmp_path):
    root = str(tmp_path / "gld")
    _make_gldv2(root)
    gldv2_reference.convert_reference(root, str(tmp_path / "reference"), num_shards=3)
    command = [sys.executable, os.path.join(REPO, "build_gldv2_main.py"),
               f"--gldv2_root={root}", f"--output_dir={tmp_path / 'beam'}", "--num_shards=3",
               "--allow_missing"]
    result = subprocess.run(command + ["--direct_num_workers=2"], capture_output=True,
                            text=True, timeout=240, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "missing: 1; undecodable: 2; classes: 4" in result.stdout
    assert "'images_missing': 1" in result.stdout
    _same_outputs(tmp_path / "beam", tmp_path / "reference")
    # The local runner chosen without a Prism attempt; each worker's log lines once.
    assert "prism" not in result.stderr.lower()
    worker_lines = [line.split(" ", 2)[2] for line in result.stderr.splitlines()
                    if " beam worker: " in line]   # "<pid> <file:line>] beam worker: ..."
    assert sum(line.endswith("Python sdk harness starting.") for line in worker_lines) == 2
    assert len(worker_lines) == len(set(worker_lines))
    assert "Worker: severity" not in result.stderr
    # A flag neither ours nor Beam's is one line, not a silently dropped typo.
    result = subprocess.run(command + ["--num_shard=3"], capture_output=True, text=True,
                            timeout=240, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2
    assert "unknown flag(s) ['--num_shard=3']" in result.stderr
    # LOOPBACK on a cluster runner would run the work here: refused, before any work.
    result = subprocess.run(command + ["--runner=FlinkRunner", "--flink_master=h:8081",
                                       "--environment_type=LOOPBACK"],
                            capture_output=True, text=True, timeout=240, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2
    assert ("\nbuild_gldv2_main: error: --environment_type=LOOPBACK runs the Python work in "
            "this submitting process, not on the workers of --runner=FlinkRunner: use "
            "--environment_type=DOCKER") in "\n" + result.stderr


def test_progress_bar_shows_counts_rate_and_eta():
    from glam_tf.data import progress  # pylint: disable=g-import-not-at-top

    stream = io.StringIO()
    bar = progress.ProgressBar(200, unit="images", description="writing", stream=stream)
    bar.update(50)
    line = bar.line()
    assert line.startswith("writing [=======")  # 50/200 of 30 columns -> 7
    assert " 50/200 images " in line and "images/s ETA 0:" in line
    with pytest.raises(ValueError, match="total must be >= 0"):
        progress.ProgressBar(-1)
