"""glam_tf.data.download against a local HTTP server with injected faults (no internet)."""

import dataclasses
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile

import pytest

from glam_tf import files, refusal
from glam_tf.data import download
from glam_tf.refusal import Refused
import http_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS_0 = ["0a1b2c3d4e5f6a7b", "0a1fffffffffffff", "1b2c3d4e5f6a7b8c"]
IDS_1 = ["9f8e7d6c5b4a3f2e", "abcdef0123456789"]
CSV = ("landmark_id,images\n7,0a1b2c3d4e5f6a7b 0a1fffffffffffff\n"
       "9,1b2c3d4e5f6a7b8c 9f8e7d6c5b4a3f2e abcdef0123456789\n").encode()


@pytest.fixture
def server():
    srv = http_fixture.FileServer(stall_s=1.0)
    srv.tar0 = http_fixture.make_tar(http_fixture.gldv2_members(IDS_0))
    srv.tar1 = http_fixture.make_tar(http_fixture.gldv2_members(IDS_1))
    srv.add_gldv2_tar(0, srv.tar0)
    srv.add_gldv2_tar(1, srv.tar1)
    srv.files["/gldv2/metadata/train_clean.csv"] = CSV
    yield srv
    srv.close()


def _config(server, out, **kw):
    base = dict(datasets=("gldv2_train_clean",), output_dir=str(out), base_url=server.url,
                gldv2_tars=(0, 1), backoff_s=0.01, timeout_s=0.3, tries=3, parallel=2,
                log_every_s=0.0)
    base.update(kw)
    return download.DownloadConfig(**base)


def _tar_requests(server, index=0):
    return [start for path, start in server.requests
            if path == f"/gldv2/train/images_{index:03d}.tar"]


def test_fetches_verifies_extracts_and_a_rerun_fetches_nothing(server, tmp_path, caplog):
    # absl's own logger too: a test before it in this process may have lowered its level.
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="absl")
    summary = download.download(_config(server, tmp_path / "out"))
    root = tmp_path / "out" / "gldv2"
    assert (root / "train_clean.csv").read_bytes() == CSV
    for i in IDS_0 + IDS_1:
        assert (root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg").is_file()
    assert (root / "archive_members" / "images_000.tar.txt").read_text().split() == [
        f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in IDS_0]
    manifest = json.loads((tmp_path / "out" / download.MANIFEST_NAME).read_text())
    tar0 = manifest["gldv2/train/images_000.tar"]
    assert tar0["md5"] == hashlib.md5(server.tar0).hexdigest()
    assert tar0["check"] == "published md5" and tar0["members"] == 3
    csv_entry = manifest["gldv2/metadata/train_clean.csv"]
    assert csv_entry["sha256"] == hashlib.sha256(CSV).hexdigest()
    assert csv_entry["size"] == len(CSV) and csv_entry["md5"] is None
    assert len(summary.fetched) == 3 and summary.bytes_fetched >= len(server.tar0)
    assert not list((tmp_path / "out" / "downloads").rglob("*.tar"))  # archives deleted
    assert any("/s ETA" in r.getMessage() for r in caplog.records)
    # Rerun: everything is recorded and present, so nothing is requested.
    count = len(server.requests)
    again = download.download(_config(server, tmp_path / "out"))
    assert len(server.requests) == count and not again.fetched and len(again.skipped) == 3
    # An extracted image deleted: only its tar is fetched again.
    (root / "train" / "1" / "b" / "2" / "1b2c3d4e5f6a7b8c.jpg").unlink()
    download.download(_config(server, tmp_path / "out"))
    fetched = {p for p, _ in server.requests[count:] if p.endswith(".tar")}
    assert fetched == {"/gldv2/train/images_000.tar"}
    assert (root / "train" / "1" / "b" / "2" / "1b2c3d4e5f6a7b8c.jpg").is_file()


def test_progress_counts_bytes_present_and_estimates_the_rest():
    meter = download.ByteProgress(3, log_every_s=None)
    meter.expect("a", 3 * 2**20, present=2**20)   # resumed: 1 MiB there already
    meter.add(2**20)
    meter.file_done("b", 2 * 2**20)                # installed before: nothing to fetch
    line = meter.line()
    # Total: a 3 MiB + b 2 MiB + c (not started) at their mean, 2.5 MiB.
    assert line.startswith("download: fetched 1.0 MiB of ~7.5 MiB (1/3 files done) ")
    assert "/s ETA 0:00:0" in line   # 3.5 MiB left at the rate of a fast test


def test_an_interrupted_file_resumes_to_identical_bytes(server, tmp_path):
    # A killed run left half of tar 0: the rerun asks only for the rest.
    dl = tmp_path / "out" / "downloads" / "gldv2" / "train"
    dl.mkdir(parents=True)
    half = len(server.tar0) // 2
    (dl / ("images_000.tar" + download.PARTIAL_SUFFIX)).write_bytes(server.tar0[:half])
    download.download(_config(server, tmp_path / "out", keep_archives=True))
    assert _tar_requests(server) == [half]
    assert (dl / "images_000.tar").read_bytes() == server.tar0
    # A connection cut mid-file: retried from where it stopped, in the same run.
    server.faults["/gldv2/train/images_001.tar"] = ["cut"]
    download.download(_config(server, tmp_path / "out2", keep_archives=True))
    starts = _tar_requests(server, 1)
    assert starts[-2:] == [0, (len(server.tar1)) // 2]
    assert (tmp_path / "out2" / "downloads" / "gldv2" / "train" /
            "images_001.tar").read_bytes() == server.tar1


@pytest.mark.parametrize("faults", [["500", "500"], ["stall"], ["cut", "cut", "500"]])
def test_transient_errors_are_retried(server, tmp_path, faults):
    server.faults["/gldv2/train/images_000.tar"] = list(faults)
    download.download(_config(server, tmp_path / "out", keep_archives=True))
    assert (tmp_path / "out" / "downloads" / "gldv2" / "train" /
            "images_000.tar").read_bytes() == server.tar0


def test_wrong_bytes_are_fetched_again_then_refused_naming_the_file(server, tmp_path):
    server.faults["/gldv2/train/images_000.tar"] = ["wrong"]
    download.download(_config(server, tmp_path / "out"))
    assert _tar_requests(server) == [0, 0]
    assert (tmp_path / "out" / "gldv2" / "train" / "0" / "a" / "1").is_dir()

    server.faults["/gldv2/train/images_001.tar"] = ["wrong"] * 3
    with pytest.raises(Refused) as caught:
        download.download(_config(server, tmp_path / "out3", datasets=("gldv2_train_clean",)))
    line = refusal.describe(caught.value)
    assert line.startswith("images_001.tar: md5 ") and "after 3 tries" in line
    assert "\n" not in line
    assert not (tmp_path / "out3" / "gldv2" / "train" / "9").exists()


def test_http_errors_refuse_in_one_line(server, tmp_path):
    server.faults["/gldv2/train/images_001.tar"] = ["500"] * 5
    with pytest.raises(Refused, match=r"images_001\.tar: .* failed 3 times in a row "
                                      r"\(last: HTTP 500"):
        download.download(_config(server, tmp_path / "a"))
    server.faults["/gldv2/train/images_001.tar"] = ["404"]
    with pytest.raises(Refused, match=r"/gldv2/train/images_001\.tar: HTTP 404"):
        download.download(_config(server, tmp_path / "b"))


HOSTILE = {
    "absolute path": ("{tmp}/evil.jpg", b"x"),
    "'..'": ("0/../../evil.jpg", b"x"),
    "symbolic link": "sym",
    "hard link": "hard",
    "character device": "chr",
    "fifo": "fifo",
    "oversized member": ("0/1/2/big.jpg", b"y" * 4096),
}


def _hostile_member(kind, tmp):
    value = HOSTILE[kind]
    if isinstance(value, tuple):
        return value[0].format(tmp=tmp), value[1]
    info = tarfile.TarInfo("0/1/2/odd.jpg")
    info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE,
                 "fifo": tarfile.FIFOTYPE}[value]
    info.linkname = "../../../etc/passwd" if value in ("sym", "hard") else ""
    return info, None


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_written(server, tmp_path, kind):
    members = http_fixture.gldv2_members(IDS_0[:1]) + [_hostile_member(kind, tmp_path)]
    server.add_gldv2_tar(0, http_fixture.make_tar(members))
    out = tmp_path / "deep" / "out"
    with pytest.raises(Refused) as caught:
        download.download(_config(server, out, gldv2_tars=(0,), max_member_bytes=1024,
                                  parallel=1))
    line = refusal.describe(caught.value)
    assert line.startswith("images_000.tar: archive member "), line
    assert repr(members[-1][0].name if members[-1][1] is None else members[-1][0]) in line
    assert not (out / "gldv2" / "train").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "downloads" not in
                  str(p)) == ["download_manifest.json", "train_clean.csv"]


def test_revisited_archives_flatten_and_record_sha256(server, tmp_path):
    tgz = http_fixture.make_tar([("oxbuild/all_souls_000001.jpg", http_fixture.jpeg(1)),
                                 ("oxbuild/radcliffe_camera_000002.jpg", http_fixture.jpeg(2))],
                                gzip=True)
    server.files["/oxbuildings/oxbuild_images-v1.tgz"] = tgz
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = b"pickle bytes"
    config = _config(server, tmp_path / "out", datasets=("roxford5k",))
    download.download(config)
    assert sorted(os.listdir(tmp_path / "out" / "roxford5k" / "jpg")) == [
        "all_souls_000001.jpg", "radcliffe_camera_000002.jpg"]
    manifest = json.loads((tmp_path / "out" / download.MANIFEST_NAME).read_text())
    entry = manifest["oxbuildings/oxbuild_images-v1.tgz"]
    assert entry["sha256"] == hashlib.sha256(tgz).hexdigest() and entry["size"] == len(tgz)
    assert entry["check"] == "read whole, size and sha256 recorded"
    # A gzip whose CRC does not match its content is not a readable archive.
    damaged = tmp_path / "damaged.tgz"
    damaged.write_bytes(tgz[:-8] + bytes(b ^ 0xFF for b in tgz[-8:-4]) + tgz[-4:])
    with pytest.raises(OSError, match="CRC"):
        download.check_archive(str(damaged), max_member_bytes=2**20, name="damaged.tgz")
    # A damaged archive is fetched again; served damaged every time, it is refused.
    server.faults["/oxbuildings/oxbuild_images-v1.tgz"] = ["wrong"] * 3
    with pytest.raises(Refused, match=r"oxbuild_images-v1\.tgz: not a readable archive"):
        download.download(dataclasses.replace(config, output_dir=str(tmp_path / "o2")))


def test_ram_output(server, tmp_path):
    out = "ram://download_test/out"
    download.download(_config(server, out))
    assert files.read_bytes(f"{out}/gldv2/train_clean.csv") == CSV
    assert files.exists(f"{out}/gldv2/train/a/b/c/abcdef0123456789.jpg")
    count = len(server.requests)
    download.download(_config(server, out))
    assert len(server.requests) == count
    files.rmtree("ram://download_test")


def test_a_full_disk_is_a_one_line_refusal(server, tmp_path, monkeypatch):
    real_open = files.open_file

    class Full:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            if data:
                raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r"):
        if "w" in mode and "/gldv2/train/" in str(path) and "downloads" not in str(path):
            return Full(path)
        return real_open(path, mode)

    monkeypatch.setattr(files, "open_file", fake_open)
    with pytest.raises(OSError) as caught:
        download.download(_config(server, tmp_path / "out", gldv2_tars=(0,), parallel=1))
    line = refusal.describe(caught.value)
    assert "no space left on the device" in line and "/gldv2/train/" in line
    assert not [p for p in (tmp_path / "out").rglob("*") if files.TEMPORARY_TAG in p.name]


def test_program_exit_codes(server, tmp_path):
    server.faults["/gldv2/train/images_000.tar"] = ["404"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "download_main.py"), "--datasets=gldv2_train_clean",
         f"--output_dir={tmp_path / 'out'}", f"--base_url={server.url}", "--gldv2_tars=0",
         "--backoff_s=0.01"], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert run.returncode == refusal.EXIT_REFUSED, run.stderr
    lines = [l for l in run.stderr.splitlines() if l.startswith("download_main:")]
    assert len(lines) == 1 and "images_000.tar: HTTP 404" in lines[0]
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "download_main.py"), "--datasets=gldv3",
         f"--output_dir={tmp_path / 'o'}"], capture_output=True, text=True, env=env, cwd=REPO,
        check=False)
    assert bad.returncode == refusal.EXIT_USAGE and "--datasets must name" in bad.stderr


# ---------------------------------------------------------------------------- converter

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """GLDv2 tars 0 and 1 fetched from the local server; one image of tar 1 then deleted."""
    srv = http_fixture.FileServer()
    srv.add_gldv2_tar(0, http_fixture.make_tar(http_fixture.gldv2_members(IDS_0)))
    srv.add_gldv2_tar(1, http_fixture.make_tar(http_fixture.gldv2_members(IDS_1)))
    srv.files["/gldv2/metadata/train_clean.csv"] = CSV
    out = tmp_path_factory.mktemp("downloaded")
    try:
        download.download(_config(srv, out))
    finally:
        srv.close()
    (out / "gldv2" / "train" / "9" / "f" / "8" / "9f8e7d6c5b4a3f2e.jpg").unlink()
    return out / "gldv2"


def test_converter_refuses_missing_images_naming_their_tar(downloaded, tmp_path):
    from glam_tf.data import gldv2  # pylint: disable=import-outside-toplevel

    out = tmp_path / "tfr"
    with pytest.raises(gldv2.MissingImagesError) as caught:
        gldv2.convert_gldv2(str(downloaded), str(out), beam_args=IN_MEMORY)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("1 of the 5 images listed in ")
    assert "9f8e7d6c5b4a3f2e is in images_001.tar" in message and "--allow_missing" in message
    assert (out / gldv2.MISSING_BY_TAR_NAME).read_text().split("\t")[:2] == [
        "images_001.tar", "9f8e7d6c5b4a3f2e"]
    assert not list(out.glob("*.tfrecord"))


@pytest.fixture(scope="module")
def converted(downloaded, tmp_path_factory):
    """The download converted with --allow_missing and landmark 7 excluded."""
    from glam_tf.data import gldv2  # pylint: disable=import-outside-toplevel

    folder = tmp_path_factory.mktemp("converted")
    exclude = folder / "exclude.txt"
    exclude.write_text("# landmarks also in the test sets\n7\n123456\n")
    out = folder / "tfr"
    summary = gldv2.convert_gldv2(str(downloaded), str(out), num_shards=2, allow_missing=True,
                                  exclude_landmarks=str(exclude), beam_args=IN_MEMORY)
    return summary, out, exclude


def test_allow_missing_and_excluded_landmarks_are_counted(converted):
    summary, out, exclude = converted
    done = json.loads((out / "summary.json").read_text())
    assert done["missing"] == 1 and done["missing_by_tar"] == {"images_001.tar": 1}
    assert done["excluded"] == {
        "file": "exclude.txt", "sha256": hashlib.sha256(exclude.read_bytes()).hexdigest(),
        "landmarks_listed": 2, "landmarks_left_out": [7], "images_left_out": 2}
    assert summary.total_written == 2 and summary.num_classes == 1


def test_the_converted_folder_is_a_tfds_dataset_with_the_same_records(converted):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    from glam_tf.data import records, tfds_folder  # pylint: disable=import-outside-toplevel

    summary, out, _ = converted
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.splits["train"].num_examples == summary.total_written
    assert list(builder.info.splits) == ["train"]
    via_tfds = {}
    for example in tfds.as_numpy(builder.as_dataset(split="train")):
        flat = tfds_folder.flatten(example)
        assert sorted(flat) == sorted(records.FEATURE_SPEC)
        via_tfds[flat[records.KEY_ID]] = flat
    own = {}
    shards = sorted(tf.io.gfile.glob(summary.train_pattern))
    for serialized in tf.data.TFRecordDataset(shards):
        parsed = {k: v.numpy() for k, v in records.parse_example(serialized).items()}
        own[parsed[records.KEY_ID]] = parsed
    assert sorted(own) == sorted(via_tfds) == [b"1b2c3d4e5f6a7b8c", b"abcdef0123456789"]
    for key, record in own.items():
        assert {k: via_tfds[key][k] for k in record} == record
    paths, count = tfds_folder.split_files(str(out))
    assert paths == shards and count == 2


def test_training_reads_the_tfds_folder(converted, tmp_path):
    from glam_tf.config import DataConfig, SettingError, TrainConfig  # pylint: disable=C0415
    from glam_tf.refusal import Refused as Refusal  # pylint: disable=import-outside-toplevel
    from glam_tf.train import data, distribute  # pylint: disable=import-outside-toplevel

    summary, out, _ = converted
    config = TrainConfig(train_dir=str(tmp_path / "run"), data_source="tfds",
                         tfds_dir=str(out), train_steps=2,
                         data=DataConfig(global_batch_size=2, size_scale=1 / 16,
                                         shuffle_buffer=4, deterministic=True))
    config.validate()
    worker = distribute.WorkerInfo(num_workers=1, worker_index=0, is_chief=True,
                                   num_replicas=1, local_replicas=1)
    source = data.prepare(config, worker)
    assert (source.num_examples, source.num_classes) == (2, 1)
    assert str(out) in source.description
    images, labels = next(iter(source.dataset))
    assert images.shape[0] == 2 and labels.numpy().tolist() == [0, 0]
    with pytest.raises(SettingError, match="--tfds_dir holds no dataset_info.json"):
        TrainConfig(**{**config.__dict__, "tfds_dir": str(tmp_path)}).validate()
    # Metadata naming a shard that is gone: refused before reading.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("dataset_info.json", "features.json", "summary.json",
                 "train-00000-of-00002.tfrecord"):
        (copy / name).write_bytes((out / name).read_bytes())
    with pytest.raises(Refusal, match=r"names 2 'train' shards but 1 match"):
        data.tfds_train_pattern(str(copy))


def test_addresses_are_the_published_ones():
    config = download.DownloadConfig(datasets=download.DATASETS, output_dir="out")
    urls = {}
    for remote in download.remotes(config):
        urls[config.url(remote.host, remote.path)] = (
            config.url(remote.host, remote.md5_path) if remote.md5_path else None,
            sorted(i.target for i in remote.installs))
    s3 = "https://s3.amazonaws.com/google-landmark"
    assert urls[f"{s3}/train/images_499.tar"] == (
        f"{s3}/md5sum/train/md5.images_499.txt", ["gldv2/train"])
    assert urls[f"{s3}/metadata/train_clean.csv"] == (None, ["gldv2/train_clean.csv"])
    assert urls[f"{s3}/metadata/train.csv"] == (None, ["gldv2/train.csv"])
    vgg = "https://www.robots.ox.ac.uk/~vgg/data"
    assert urls[f"{vgg}/oxbuildings/oxbuild_images-v1.tgz"] == (
        None, ["oxford5k/jpg", "roxford5k/jpg"])  # fetched once for both
    assert urls[f"{vgg}/parisbuildings/paris_2-v1.tgz"][1] == ["paris6k/jpg", "rparis6k/jpg"]
    assert urls[f"{vgg}/oxbuildings/gt_files_170407.tgz"][1] == ["oxford5k/gt_files"]
    assert urls[f"{vgg}/parisbuildings/paris_120310.tgz"][1] == ["paris6k/gt_files"]
    cmp = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
    assert urls[f"{cmp}/rparis6k/gnd_rparis6k.pkl"][1] == ["rparis6k/gnd_rparis6k.pkl"]
    ptak = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
    assert urls[f"{ptak}/jpg/revisitop1m.100.tar.gz"][1] == ["revisitop1m/jpg"]
    assert urls[f"{ptak}/revisitop1m.txt"][1] == ["revisitop1m/revisitop1m.txt"]
    assert len(urls) == 500 + 2 + 100 + 1 + 2 + 3 + 2  # tars, csvs, 1M, list, Ox, Pa, gnd
    mirrored = dataclasses.replace(config, mirrors=(("gldv2", "http://mirror/gl"),))
    assert mirrored.url("gldv2", "train/images_000.tar") == "http://mirror/gl/train/images_000.tar"
    with pytest.raises(ValueError, match="--gldv2_tars must be numbers in"):
        dataclasses.replace(config, gldv2_tars=(500,)).validate()
    assert download.parse_ranges("0-2,7") == (0, 1, 2, 7)


def test_converter_program_refuses_in_one_line(downloaded, tmp_path):
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "build_gldv2_main.py"),
         f"--gldv2_root={downloaded}", f"--output_dir={tmp_path / 'tfr'}"],
        capture_output=True, text=True, cwd=REPO, check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == refusal.EXIT_USAGE, run.stderr[-2000:]
    line = [l for l in run.stderr.splitlines() if l.startswith("build_gldv2_main: error:")]
    assert len(line) == 1 and "9f8e7d6c5b4a3f2e is in images_001.tar" in line[0]
