"""Tests of the training input pipeline: decoding, aspect groups, losses, resume, sharding."""

import collections
import csv
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf.config import DataConfig
from glam_tf.data import pipeline, records

# (width, height) per h/w group with the default edges (0.67, 0.77, 1.33, 1.5):
# group 0: h/w < 0.67, 1: < 0.77, 2: < 1.33, 3: < 1.5, 4: >= 1.5.
_GROUP_SHAPES = ((48, 30), (48, 34), (40, 40), (32, 45), (30, 50))
_NO_DAMAGE = {"damaged_spans": 0, "damaged_bytes": 0, "damaged_records": 0}


def _jpeg(width, height, seed=0, mode="RGB", fmt="JPEG"):
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _write(path, items):
    """items: (image_id, label, encoded bytes); garbage bytes get a fake header info."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image_id, label, data in items:
            try:
                info = records.probe_image(data)
            except records.UndecodableImageError:
                info = records.ImageInfo(height=10, width=10, channels=3, format="jpeg")
            writer.write(records.make_example(encoded=data, image_id=image_id, label=label,
                                              info=info).SerializeToString())


@pytest.fixture(scope="module")
def grouped_records(tmp_path_factory):
    """3 shards of tiny JPEGs with known groups: counts per group (4, 8, 16, 8, 4)."""
    root = tmp_path_factory.mktemp("grouped")
    counts = (4, 8, 16, 8, 4)
    items, groups = [], {}
    n = 0
    for g, (count, (w, h)) in enumerate(zip(counts, _GROUP_SHAPES)):
        for _ in range(count):
            image_id = f"{n:016x}"
            items.append((image_id, n % 5, _jpeg(w, h, seed=n)))
            groups[image_id] = g
            n += 1
    for k in range(3):
        _write(root / f"train-{k:05d}-of-00003.tfrecord", items[k::3])
    return str(root / "train-*"), groups, counts


def _config(pattern, **kw):
    defaults = dict(global_batch_size=4, size_scale=1 / 8, shuffle_buffer=16,
                    deterministic=True)
    defaults.update(kw)
    return DataConfig(file_pattern=pattern, **defaults)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="--aspect_edges must be strictly increasing"):
        DataConfig("x", aspect_edges=(0.7, 0.6, 1.3, 1.5)).validate()
    with pytest.raises(ValueError, match="--aspect_edges must be a non-empty list of finite "
                                         "numbers > 0"):
        DataConfig("x", aspect_edges=(-1.0, 0.6, 1.3, 1.5)).validate()
    with pytest.raises(ValueError, match=r"--bucket_sizes needs len\(aspect_edges\) \+ 1 = 5"):
        DataConfig("x", bucket_sizes=((32, 32),)).validate()
    with pytest.raises(ValueError, match=r"--crop_scale must be a number in \[0, 1\)"):
        DataConfig("x", crop_scale=1.5).validate()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        pipeline.build_train_dataset(DataConfig("/nonexistent/train-*"))
    with pytest.raises(ValueError, match=r"global_batch_size \(64\) must be divisible"):
        pipeline.build_train_dataset(DataConfig("x"), num_input_pipelines=3)


def test_scaled_bucket_sizes():
    config = DataConfig("x", size_scale=0.25)
    # 352/4 = 88 -> 96, 448/4 = 112 -> 128 (half rounds up), 384/4 = 96.
    assert config.scaled_bucket_sizes() == ((128, 96), (128, 96), (128, 128), (96, 128),
                                            (96, 128))
    assert DataConfig("x", size_scale=0.01).scaled_bucket_sizes()[0] == (32, 32)
    assert DataConfig("x").scaled_bucket_sizes() == (
        (512, 352), (512, 384), (448, 448), (384, 512), (352, 512))


def test_aspect_group_reference():
    edges = (0.67, 0.77, 1.33, 1.5)
    heights = np.array([30, 34, 40, 45, 50, 67, 150])
    widths = np.array([48, 48, 40, 32, 30, 100, 100])
    np.testing.assert_array_equal(pipeline.aspect_group(heights, widths, edges),
                                  [0, 1, 2, 3, 4, 1, 4])


def test_one_pass_loses_and_repeats_nothing(grouped_records):
    pattern, groups, counts = grouped_records
    config = _config(pattern)
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(config, repeat=False, with_ids=True, stats=stats)
    sizes = config.scaled_bucket_sizes()
    seen = collections.Counter()
    per_group = collections.Counter()
    for images, labels, ids in ds:
        ids = [i.decode() for i in ids.numpy()]
        batch_groups = {groups[i] for i in ids}
        assert len(batch_groups) == 1, f"batch mixes groups {batch_groups}"
        (g,) = batch_groups
        w, h = sizes[g]
        assert images.shape[1:] == (h, w, 3)
        assert images.dtype == tf.float32 and labels.dtype == tf.int32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
        np.testing.assert_array_equal(labels.numpy(), [int(i, 16) % 5 for i in ids])
        seen.update(ids)
        per_group[g] += len(ids)
    assert set(seen) == set(groups) and set(seen.values()) == {1}
    assert [per_group[g] for g in range(5)] == list(counts)
    assert stats.result() == {**_NO_DAMAGE, "examined": len(groups), "dropped": 0}


def test_repeated_stream_group_frequencies_follow_input(grouped_records):
    pattern, groups, counts = grouped_records
    ds = pipeline.build_train_dataset(_config(pattern, seed=3), with_ids=True)
    per_group = collections.Counter()
    n_batches = 60  # 240 images = 6 passes over the 40 records
    for images, labels, ids in ds.take(n_batches):
        assert images.shape[0] == 4  # training batches are always full
        batch_groups = {groups[i.decode()] for i in ids.numpy()}
        assert len(batch_groups) == 1
        per_group[batch_groups.pop()] += 4
    expected = np.array(counts) / sum(counts)
    observed = np.array([per_group[g] for g in range(5)]) / (4 * n_batches)
    # Only the partial windows still buffered at the end can differ: <= 3 images per group.
    np.testing.assert_allclose(observed, expected, atol=5 * 3 / (4 * n_batches))


def test_real_photos_batches_share_group_and_size(shared_data, tmp_path):
    crops = shared_data / "oxford_query_crops"
    with open(crops / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:24]
    items, group_of = [], {}
    edges = (0.67, 0.77, 1.33, 1.5)
    for k, row in enumerate(rows):
        image_id = f"{k:016x}"
        items.append((image_id, k % 3, (crops / row["filename"]).read_bytes()))
        group_of[image_id] = int(pipeline.aspect_group(int(row["height"]),
                                                       int(row["width"]), edges))
    assert len(set(group_of.values())) >= 3  # portrait, landscape and square-ish photos
    _write(tmp_path / "real.tfrecord", items)
    config = _config(str(tmp_path / "real.tfrecord"), size_scale=1 / 16, global_batch_size=2)
    sizes = config.scaled_bucket_sizes()
    seen = []
    for images, _, ids in pipeline.build_train_dataset(config, repeat=False, with_ids=True):
        gs = {group_of[i.decode()] for i in ids.numpy()}
        assert len(gs) == 1
        w, h = sizes[gs.pop()]
        assert images.shape[1:] == (h, w, 3)
        seen.extend(i.decode() for i in ids.numpy())
    assert sorted(seen) == sorted(group_of)


def test_corrupt_records_are_dropped_and_counted(tmp_path, capfd):
    good = [(f"{k:016x}", k, _jpeg(40, 40, seed=k)) for k in range(6)]
    truncated = ("bad0000000000001", 0, _jpeg(40, 40, seed=9)[:120])
    garbage = ("bad0000000000002", 0, b"this is not an image")
    empty = ("bad0000000000003", 0, b"")
    _write(tmp_path / "a.tfrecord", good[:3] + [truncated, garbage] + good[3:] + [empty])
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as writer:
        writer.write(b"\x00not a tf.train.Example")  # unparseable record
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(_config(str(tmp_path / "*.tfrecord")), repeat=False,
                                      with_ids=True, stats=stats)
    ids = [i.decode() for _, _, batch in ds for i in batch.numpy()]
    assert sorted(ids) == sorted(i for i, _, _ in good)
    assert stats.result() == {**_NO_DAMAGE, "examined": 10, "dropped": 4}
    assert stats.log() == {**_NO_DAMAGE, "examined": 10, "dropped": 4}
    err = capfd.readouterr().err  # the first 10 drops are each reported with their id
    for image_id in ("bad0000000000001", "bad0000000000002", "bad0000000000003",
                     "<unparseable record>"):
        assert f'dropped record id= "{image_id}"' in err


def test_decodes_png_grey_rgba_cmyk_palette_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    base = np.asarray(Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
                      .resize((64, 64), Image.BILINEAR))

    def enc(image, fmt):
        buf = io.BytesIO()
        image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()

    alpha = np.full((64, 64, 1), 77, np.uint8)
    cases = {
        "rgba_png": (enc(Image.fromarray(np.concatenate([base, alpha], -1), "RGBA"), "PNG"), 0),
        "palette_png": (enc(Image.fromarray(base).convert("P"), "PNG"), 0),
        "grey16_png": (enc(Image.fromarray(base[..., 0].astype(np.uint16) * 257), "PNG"), 0),
        "grey_jpeg": (enc(Image.fromarray(base[..., 0]), "JPEG"), 3.0),
        "cmyk_jpeg": (enc(Image.fromarray(base).convert("CMYK"), "JPEG"), 3.0),
    }
    items = [(f"{k:016x}", k, data) for k, (data, _) in enumerate(cases.values())]
    _write(tmp_path / "f.tfrecord", items)
    # One 64 x 64 bucket, no crop, no brightness: the output is the decoded image itself.
    config = _config(str(tmp_path / "f.tfrecord"), size_scale=1.0, global_batch_size=1,
                     crop_scale=0.0, brightness=0.0, bucket_sizes=((64, 64),) * 5)
    out = {int(i[0].numpy(), 16): img[0].numpy() for img, _, i in
           pipeline.build_train_dataset(config, repeat=False, with_ids=True)}
    assert len(out) == len(cases)
    for k, (name, (data, tolerance)) in enumerate(cases.items()):
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
        if name == "grey16_png":
            reference = np.repeat(base[..., :1], 3, -1).astype(np.float32)
        diff = np.abs(out[k] - reference).mean()
        assert diff <= tolerance, f"{name}: mean abs difference {diff}"


def test_brightness_and_crop_augmentation(tmp_path):
    flat = np.full((64, 64, 3), 100, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(flat).save(buf, "PNG")
    _write(tmp_path / "g.tfrecord", [(f"{k:016x}", 0, buf.getvalue()) for k in range(40)])
    config = _config(str(tmp_path / "g.tfrecord"), size_scale=1.0, global_batch_size=1,
                     bucket_sizes=((64, 64),) * 5, crop_scale=0.2, brightness=0.1)
    values = []
    for images, _ in pipeline.build_train_dataset(config, repeat=False):
        image = images[0].numpy()
        # A flat image stays flat under crop (inside or zoomed out: mean-colour border) and
        # brightness shifts it uniformly by at most 0.1 * 255.
        assert image.max() - image.min() <= 1.0
        values.append(image.mean())
    values = np.array(values)
    assert np.all(np.abs(values - 100) <= 25.5 + 0.5)
    assert values.std() > 5  # the deltas really vary


def test_iterator_checkpoint_restores_next_batch(grouped_records, tmp_path):
    pattern, _, _ = grouped_records
    ds = pipeline.build_train_dataset(_config(pattern), with_ids=True)
    iterator = iter(ds)
    for _ in range(3):
        next(iterator)
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    expected = [next(iterator) for _ in range(3)]
    checkpoint.restore(path)
    for want in expected:
        got = next(iterator)
        np.testing.assert_array_equal(got[2].numpy(), want[2].numpy())
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())


def test_skip_examples_resumes_the_stream(grouped_records):
    pattern, _, _ = grouped_records
    # Batch 1: batches come out in stream order, so the skipped stream must equal the tail.
    config = _config(pattern, global_batch_size=1, seed=7)
    full = list(pipeline.build_train_dataset(config, with_ids=True).take(30))
    resumed = list(pipeline.build_train_dataset(config, with_ids=True,
                                                skip_examples=12).take(18))
    for want, got in zip(full[12:], resumed):
        np.testing.assert_array_equal(got[2].numpy(), want[2].numpy())
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())  # same augmentation


@pytest.mark.parametrize("num_files", [3, 1])
def test_input_pipelines_split_the_data(grouped_records, tmp_path, num_files):
    pattern, groups, _ = grouped_records
    if num_files == 1:  # fewer files than pipelines: records are split instead
        merged = tmp_path / "one.tfrecord"
        with tf.io.TFRecordWriter(str(merged)) as writer:
            for record in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
                writer.write(record.numpy())
        pattern = str(merged)
    config = _config(pattern, global_batch_size=4)
    parts = []
    for pid in range(2):
        ds = pipeline.build_train_dataset(config, num_input_pipelines=2, input_pipeline_id=pid,
                                          repeat=False, with_ids=True)
        batches = list(ds)
        assert all(b[0].shape[0] <= 2 for b in batches)  # 4 // 2 pipelines
        parts.append({i.decode() for b in batches for i in b[2].numpy()})
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(groups)


def test_make_dataset_fn_uses_input_context(grouped_records):
    pattern, _, _ = grouped_records
    config = _config(pattern, global_batch_size=8)
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                     num_replicas_in_sync=4)
    ds = pipeline.make_dataset_fn(config, steps_done=3)(ctx)
    images, labels = next(iter(ds))
    assert images.shape[0] == 2 and labels.shape == (2,)  # per replica: 8 // 4


# ---- records that cannot hang or poison a run --------------------------------------------
def _png_bomb(width, height):
    """A valid PNG (CRCs right) declaring width x height RGB with a few bytes of data."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_nothing_decodes_fails_within_the_run_limit(tmp_path):
    # Garbage and pixel bombs only: the endless (repeat) stream must end with an error.
    _write(tmp_path / "train-0.tfrecord",
           [(f"{k:016x}", 0, b"not an image" if k % 2 else _png_bomb(20000, 20000))
            for k in range(7)])
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(_config(str(tmp_path / "*.tfrecord"),
                                              max_undecodable_run=50), stats=stats)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"\[50\] \[records in a row could not be decoded or were "
                             r"dropped \(the last: id=.*DataConfig.max_undecodable_run=50\)"):
        next(iter(ds))
    assert 50 <= stats.result()["dropped"] <= 50 + 16     # + what was read ahead


def test_pixel_bomb_is_dropped_before_decoding_and_counted(tmp_path):
    good = [(f"{k:016x}", k % 3, _jpeg(40, 40, seed=k)) for k in range(6)]
    _write(tmp_path / "train-0.tfrecord", good[:3] + [("b" * 16, 1, _png_bomb(16000, 16000))]
           + good[3:])
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(_config(str(tmp_path / "*.tfrecord")), repeat=False,
                                      with_ids=True, stats=stats)
    ids = {i.decode() for _, _, batch in ds for i in batch.numpy()}
    assert ids == {image_id for image_id, _, _ in good}
    assert stats.result()["dropped"] == 1
    # The cap is a setting: under it the 40 x 40 records pass, over it they are dropped too.
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(_config(str(tmp_path / "*.tfrecord"),
                                              max_decoded_pixels=1599), repeat=False,
                                      stats=stats)
    assert list(ds) == [] and stats.result()["dropped"] == 7


@pytest.mark.parametrize("label", [-1, 5])
def test_label_out_of_range_is_refused_or_skipped(tmp_path, label):
    good = [(f"{k:016x}", k % 5, _jpeg(40, 40, seed=k)) for k in range(6)]
    _write(tmp_path / "train-0.tfrecord", good[:4] + [("e" * 16, label, _jpeg(40, 40))]
           + good[4:])
    pattern = str(tmp_path / "*.tfrecord")
    ds = pipeline.build_train_dataset(_config(pattern), repeat=False, num_classes=5)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"record id=\] \[eeeeeeeeeeeeeeee\] \[at stream position\] \[\d+\] "
                             rf"\[has label\] \[{label}\] \[outside \[0, 5\) .*"
                             r"--skip_damaged_records"):
        list(ds)
    stats = pipeline.DecodeStats()
    ds = pipeline.build_train_dataset(_config(pattern, skip_damaged_records=True),
                                      repeat=False, with_ids=True, num_classes=5, stats=stats)
    labels = {i.decode(): int(l) for _, lab, batch in ds for i, l in zip(batch.numpy(),
                                                                         lab.numpy())}
    assert labels == {image_id: lab for image_id, lab, _ in good}
    assert stats.result()["dropped"] == 1


def test_label_scan_names_file_and_record_before_training(tmp_path):
    from glam_tf.train import data as train_data

    good = [(f"{k:016x}", k % 4, b"x") for k in range(5)]
    _write(tmp_path / "train-0.tfrecord", good)
    _write(tmp_path / "train-1.tfrecord", good[:2] + [("e" * 16, -3, b"x")] + good[2:])
    files = sorted(str(p) for p in tmp_path.glob("*.tfrecord"))
    assert train_data.count_records(files[:1], "p") == (5, 4)
    with pytest.raises(ValueError, match=r"1 record\(s\) of p have a label outside >= 0; the "
                                         r"first: record 2 of .*train-1.tfrecord \(label -3\)\. "
                                         r"Fix the records, or pass --skip_damaged_records"):
        train_data.count_records(files, "p")
    with pytest.raises(ValueError, match=r"3 record\(s\) of p have a label outside \[0, 3\); "
                                         r"the first: record 3 of .*train-0.tfrecord \(label 3\)"):
        train_data.count_records(files, "p", num_classes=3)
    assert train_data.count_records(files, "p", skip_bad_labels=True) == (10, 4)
