"""Client-side extraction: sizes and crops, size buckets, shards, multi-host merge,
undecodable images and resuming after a real SIGKILL (no TensorFlow: a NumPy back-end)."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from glam_tf.eval import extract
from helpers import fake_backend, fake_descriptor_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Recorder:
    def __init__(self):
        self.shapes = []

    def __call__(self, images):
        self.shapes.append(images.shape)
        return fake_descriptor_fn(images)


def _crops(shared_data):
    folder = shared_data / "oxford_query_crops"
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    return folder, rows


def test_target_size_keeps_the_full_image_scale():
    assert extract.target_size(2048, 1536, None, 1024) == ((768, 1024), False)
    assert extract.target_size(300, 400, None, 1024) == ((1024, 768), False)  # upsized too
    # Oxford all_souls_1 on a 768x1024 image: Pillow rounds the box to (136, 34, 648, 956)
    (h, w), _ = extract.target_size(768, 1024, (136.5, 34.1, 648.5, 955.7), 1024)
    assert (h, w) == (922, 512)
    # a 1000x500 crop of a 2000x1000 image: longer side 512 = 1024 * 1000 / 2000
    assert extract.target_size(2000, 1000, (0, 0, 1000, 500), 1024) == ((256, 512), False)
    # too thin for the model at the smallest scale: enlarged just enough, aspect kept
    assert extract.target_size(1000, 40, None, 1024, min_side=46) == ((46, 1149), True)
    with pytest.raises(extract.UndecodableImage, match="empty"):
        extract.target_size(100, 100, (120, 0, 150, 10), 64)


def test_load_image_crops_like_pillow_and_resizes_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    box = (10.5, 3.4, 99.6, 70.5)
    item = extract.ImageItem("a", str(tmp_path / "a.png"), box)
    (h, w), _ = extract.target_size(120, 90, box, 60)
    out = extract.load_image(item, (h, w))
    ref = Image.fromarray(arr).crop(box).resize((w, h), Image.BILINEAR)
    np.testing.assert_array_equal(out, np.asarray(ref))
    assert (h, w) == (34, 45)  # crop 90x67 (Pillow's rounding) scaled by 60/120
    # grayscale and CMYK come back as RGB
    Image.fromarray(arr[..., 0]).save(tmp_path / "g.jpg")
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("g.jpg", "c.jpg"):
        img = extract.load_image(extract.ImageItem(name, str(tmp_path / name)), (45, 60))
        assert img.shape == (45, 60, 3) and img.dtype == np.uint8


def test_undecodable_images_are_detected(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(extract.UndecodableImage):
        extract.read_size(str(tmp_path / "junk.jpg"))
    with pytest.raises(extract.UndecodableImage):
        extract.load_image(extract.ImageItem("t", str(tmp_path / "trunc.jpg")), (40, 40))
    with pytest.raises(extract.UndecodableImage):
        extract.read_size(str(tmp_path / "missing.jpg"))


def test_plan_batches_groups_identical_sizes():
    sizes = [(4, 5), (5, 4), (4, 5), None, (4, 5), (5, 4), (4, 5)]
    assert extract.plan_batches(sizes, 3) == [[0, 2, 4], [6], [1, 5]]


def test_batched_sharded_extraction_of_real_photos(tmp_path, shared_data):
    folder, rows = _crops(shared_data)
    items = [extract.ImageItem(r["filename"], str(folder / r["filename"])) for r in rows]
    rec = _Recorder()
    st = extract.extract_split(items, str(tmp_path / "f"), fake_backend(rec), max_image_size=64,
                               batch_size=4, shard_size=20, name="crops")
    assert st.complete and st.done_now == [0, 1, 2] and st.images_done == 55
    # same-size batches of up to 4, fewer calls than images
    assert all(s[0] <= 4 for s in rec.shapes) and len(rec.shapes) < 55
    assert sum(s[0] for s in rec.shapes) == 55
    assert len({s[1:3] for s in rec.shapes}) > 2  # portrait and landscape buckets
    merged = extract.merge_shards(str(tmp_path / "f"), [it.id for it in items])
    assert merged.valid.all() and merged.descriptors.shape == (55, 8)
    # equal to describing each image alone at its target size
    for k in (0, 17, 54):
        r = rows[k]
        (h, w), _ = extract.target_size(int(r["width"]), int(r["height"]), None, 64,
                                        min_side=fake_backend().min_side())
        one = fake_descriptor_fn(extract.load_image(items[k], (h, w))[None])[0]
        np.testing.assert_allclose(merged.descriptors[k], one, rtol=1e-6)
    for s in range(3):
        assert (tmp_path / "f" / f"shard-{s:05d}.npy").is_file()
        record = json.loads((tmp_path / "f" / f"shard-{s:05d}.json").read_text())
        assert record["ids"] == [it.id for it in items[20 * s:20 * s + 20]]
    # a second run finds everything done
    again = extract.extract_split(items, str(tmp_path / "f"), fake_backend(rec), max_image_size=64,
                                  batch_size=4, shard_size=20)
    assert again.done_now == [] and again.done_before == [0, 1, 2]
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings.*max_image_size"):
        extract.extract_split(items, str(tmp_path / "f"), fake_backend(), max_image_size=96,
                              batch_size=4, shard_size=20)
    with pytest.raises(ValueError, match="backend"):
        extract.extract_split(items, str(tmp_path / "f"), fake_backend(fingerprint="other"),
                              max_image_size=64, batch_size=4, shard_size=20)


def _small_set(tmp_path, n=9):
    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        p = tmp_path / "img" / f"i{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        size = [(50, 40), (40, 50)][i % 2]
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(p)
        items.append(extract.ImageItem(f"i{i}", str(p)))
    return items


def test_multi_host_shards_and_merge_check(tmp_path):
    items = _small_set(tmp_path)
    (tmp_path / "img" / "i4.jpg").write_bytes(b"broken")
    out = str(tmp_path / "hosts")
    for host in (0, 1):
        st = extract.extract_split(items, out, fake_backend(), max_image_size=48, batch_size=2,
                                   shard_size=2, num_shards=3, shard_index=host)
        assert st.mine == [s for s in range(5) if s % 3 == host]
    assert not st.complete and st.missing == [2]
    with pytest.raises(FileNotFoundError, match=r"1 of 5 shards .*shards 2\).*--shard_index \[2\]"):
        extract.merge_shards(out, [it.id for it in items], num_hosts=3)
    extract.extract_split(items, out, fake_backend(), max_image_size=48, batch_size=2,
                          shard_size=2, num_shards=3, shard_index=2)
    merged = extract.merge_shards(out, [it.id for it in items], num_hosts=3)
    single = str(tmp_path / "single")
    extract.extract_split(items, single, fake_backend(), max_image_size=48, batch_size=2,
                          shard_size=2)
    ref = extract.merge_shards(single, [it.id for it in items])
    np.testing.assert_array_equal(merged.descriptors, ref.descriptors)
    # the undecodable image: listed, flagged, zero row
    assert [u["id"] for u in merged.undecodable] == ["i4"] and merged.undecodable[0]["index"] == 4
    assert not merged.valid[4] and merged.valid.sum() == 8
    assert not merged.descriptors[4].any()
    with pytest.raises(ValueError, match="ids differ"):
        extract.merge_shards(out, [it.id for it in reversed(items)])
    with pytest.raises(ValueError, match="shard_index"):
        extract.extract_split(items, out, fake_backend(), shard_size=2, num_shards=2, shard_index=2)


_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from absl import logging
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from glam_tf.eval import extract
    import helpers
    logging.set_verbosity(logging.INFO)
    delay = float(sys.argv[1])
    def slow(images):
        time.sleep(delay)
        return helpers.fake_descriptor_fn(images)
    items = [extract.ImageItem(f"i{{i}}", p) for i, p in enumerate(sys.argv[3:])]
    st = extract.extract_split(items, sys.argv[2], helpers.fake_backend(slow), max_image_size=48,
                               batch_size=1, shard_size=2, log_every_s=0.0, name="child")
    print("DONE", st.done_before, st.done_now)
""")


def test_resume_after_sigkill(tmp_path):
    items = _small_set(tmp_path, n=12)
    out = tmp_path / "feat"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    paths = [it.path for it in items]
    proc = subprocess.Popen([sys.executable, str(script), "0.25", str(out), *paths],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 2:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "images/s" in err and "ETA" in err  # progress lines
    finished = sorted(p.name for p in out.glob("shard-*.json"))
    assert 2 <= len(finished) < 6, finished
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / f"shard-{len(finished):05d}.npy.tmp-999999").write_bytes(b"half-written")
    res = subprocess.run([sys.executable, str(script), "0", str(out), *paths],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    done_before = [int(f[6:11]) for f in finished]
    assert f"DONE {done_before}" in res.stdout
    for name, stamp in stamps.items():  # finished shards were skipped, not rewritten
        if name.endswith(".json") or name.replace(".npy", ".json") in finished:
            assert (out / name).stat().st_mtime_ns == stamp, name
    assert not list(out.glob("*.tmp-*"))
    merged = extract.merge_shards(str(out), [it.id for it in items])
    ref_dir = str(tmp_path / "ref")
    extract.extract_split(items, ref_dir, fake_backend(), max_image_size=48, batch_size=1,
                          shard_size=2)
    ref = extract.merge_shards(ref_dir, [it.id for it in items])
    np.testing.assert_array_equal(merged.descriptors, ref.descriptors)


def test_features_of_another_model_are_refused_in_one_line_that_says_what_to_do(tmp_path):
    """The README's next evaluations once collided in one folder with a ~1,300-character
    message (the whole model record twice); now: the keys that differ, short values, and
    the fix, in one line. The same model's features are reused."""
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(tmp_path / "a.jpg")
    items = [extract.ImageItem("a", str(tmp_path / "a.jpg"))]
    long_path = "/runs/demo/" + "x" * 400

    def settings(kind):
        return {"model": {"kind": kind, "model": long_path, "signature": "batched",
                          "export": {"max_image_size": 192, "scales": [1.0]}},
                "scales": [1.0]}

    out = str(tmp_path / "eval_out" / "features" / "synth-queries")
    extract.extract_split(items, out, fake_backend(), max_image_size=64, batch_size=1,
                          shard_size=10, settings=settings("SavedModel"))
    again = extract.extract_split(items, out, fake_backend(), max_image_size=64, batch_size=1,
                                  shard_size=10, settings=settings("SavedModel"))
    assert again.done_before == [0] and again.done_now == []
    with pytest.raises(ValueError) as refused:
        extract.extract_split(items, out, fake_backend(), max_image_size=64, batch_size=1,
                              shard_size=10, settings=settings("checkpoint"))
    message = str(refused.value)
    assert "\n" not in message and len(message) < 300 + len(out) * 2, message
    assert message == (f"{out} holds features extracted with other settings "
                       "(settings.model.kind 'SavedModel' there, 'checkpoint' now): pass "
                       f"another --output_dir, or delete {out} to extract again")
