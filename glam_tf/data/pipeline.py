"""Training input pipeline: DELG-keyed TFRecords -> aspect-ratio batches of augmented images.

Before anything is read, `check_shards` verifies every shard's TFRecord framing and data
CRCs (glam_tf.data.framing): damage is refused with a `DamagedShardsError` naming each file,
offset and problem, or, with `skip_damaged_records`, left out by reading clean copies of the
damaged shards' valid records (see `readable_files`). With a record folder, the data CRCs
of a shard are read once per shard version (path, size, mtime), not at every start.

Stream, per input pipeline (one per worker under tf.distribute):

  files (this pipeline's share, seeded shuffle per pass)
  -> interleaved records (order-preserving) -> [record shard when files < pipelines]
  -> seeded shuffle -> repeat -> enumerate (stream position) -> skip(skip_examples)
  -> try-decode (JPEG/PNG/grey/RGBA/CMYK -> RGB uint8; undecodable -> flagged, counted, logged,
     dropped) -> aspect group + random crop (scale 1 +- crop_scale) resized to the group's size
     + brightness -> group_by_window (one group per batch) -> float32 -> prefetch

Everything up to `skip` is deterministic for a given seed, and the augmentation of a record is
drawn from stateless RNG keyed by (seed, stream position), so `skip_examples` resumes the data
stream exactly (TF_NOTES recipe b). A plain `iter()` of the dataset is checkpointable with
`tf.train.Checkpoint(iterator=it)` (recipe a): no py_function, no stateful RNG; the only
stateful ops are the `DecodeStats` counters, which are excluded from iterator state (checkpoint
the `DecodeStats` object next to the iterator to keep its counts).
"""

import hashlib
import json
import math
import sys
import time

import numpy as np
import tensorflow as tf
from absl import logging

from glam_tf import encoded_image
from glam_tf import files as glam_files
from glam_tf.config import DataConfig
from glam_tf.refusal import PIPELINE_PREFIX, BadInput
from glam_tf.data import framing, records

AUTOTUNE = tf.data.AUTOTUNE


def aspect_group(height, width, edges) -> np.ndarray:
    """NumPy reference of the grouping: index i with edges[i-1] <= h/w < edges[i]."""
    aspect = np.asarray(height, np.float64) / np.asarray(width, np.float64)
    return np.searchsorted(np.asarray(edges, np.float64), aspect, side="right")


class DecodeStats(tf.Module):
    """Counters of records the pipeline dropped: undecodable ones and damaged TFRecord spans.

    Read them with `result()`, log them with `log()`. Every drop also logs a warning with the
    record's id and the running count. The counters are tf.Variables on the CPU; put this
    object into the training checkpoint (e.g. `tf.train.Checkpoint(data_stats=stats, ...)`)
    to carry the counts across a restart. Works created inside or outside `strategy.scope()`
    (under MirroredStrategy it becomes a MirroredVariable pair; both were tested).

    Attributes:
      examined: int64 variable, records that reached the decoder (after `skip_examples`).
      dropped: int64 variable, records dropped: parsing or decoding failed, the header
        declares more than `max_decoded_pixels`, or (with `skip_damaged_records`) a label is
        outside [0, num_classes).
      undecodable_run: int64 variable, records dropped in a row (the stream fails at
        `max_undecodable_run`).
      damaged_spans, damaged_bytes, damaged_records: int64 variables, the damaged spans of
        the shards left out of every pass (`skip_damaged_records`), their bytes, and the
        records known to be in them (a data CRC mismatch is one record; a damaged header
        hides how many records its span held, so those spans add none).
    """

    def __init__(self, name="decode_stats"):
        super().__init__(name=name)
        with tf.init_scope(), tf.device("/CPU:0"):
            self.examined = tf.Variable(0, dtype=tf.int64, trainable=False, name="examined")
            self.dropped = tf.Variable(0, dtype=tf.int64, trainable=False, name="dropped")
            # The current run of drops in a row (checkpointed with the counts).
            self.undecodable_run = tf.Variable(0, dtype=tf.int64, trainable=False,
                                               name="undecodable_run")
            self.damaged_spans = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="damaged_spans")
            self.damaged_bytes = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="damaged_bytes")
            self.damaged_records = tf.Variable(0, dtype=tf.int64, trainable=False,
                                               name="damaged_records")

    def record_damage(self, reports) -> None:
        """Sets the damaged-span counters from `check_shards` reports (what a pass leaves out)."""
        damage = [d for r in reports for d in r.damage]
        self.damaged_spans.assign(len(damage))
        self.damaged_bytes.assign(sum(d.bytes for d in damage))
        self.damaged_records.assign(sum(d.records or 0 for d in damage))

    def result(self) -> dict:
        """{"examined", "dropped", "damaged_spans", "damaged_bytes", "damaged_records"}: ints."""
        return {name: int(getattr(self, name).numpy()) for name in (
            "examined", "dropped", "damaged_spans", "damaged_bytes", "damaged_records")}

    def log(self) -> dict:
        """Logs the counts (a warning when anything was dropped) and returns `result()`."""
        counts = self.result()
        log = logging.warning if counts["dropped"] or counts["damaged_spans"] else logging.info
        log("input pipeline: %d records decoded, %d dropped as undecodable; %d damaged TFRecord "
            "spans (%d bytes, %d records known) left out of each pass",
            counts["examined"] - counts["dropped"], counts["dropped"],
            counts["damaged_spans"], counts["damaged_bytes"], counts["damaged_records"])
        return counts


class DamagedShardsError(BadInput, ValueError):
    """Training shards with damaged TFRecord framing or data; the message lists each span
    (bad input: a program exits with status 2)."""


def _tf_data_ok(path: str) -> bool:
    """Whether TensorFlow's reader reads every record of `path` (it verifies the data CRCs).

    Only for shards whose framing `framing.scan_shard` found intact: a damaged header can
    crash this reader.
    """
    try:
        tf.data.TFRecordDataset(path, buffer_size=8 << 20).reduce(
            np.int64(0), lambda n, _: n + 1)
    except tf.errors.DataLossError:
        return False
    return True


RECORD_PREFIX = "verified_shards"  # record files in the check folder: verified_shards*.json
_RECORD_EVERY_S = 30.0  # a long check saves its progress this often


def _shard_key(path: str) -> dict:
    """What identifies a version of the shard `path`: its size and modification time."""
    size, mtime_ns = glam_files.stat(path)
    return {"size": size, "mtime_ns": mtime_ns}


def load_verified(record_dir: str | None) -> dict:
    """{absolute path: {"size", "mtime_ns"}} of the shards whose data CRCs verified, from
    every record file in `record_dir` (one per worker); {} when there is none."""
    if not record_dir:
        return {}
    return _load_records(glam_files.glob(glam_files.join(record_dir, RECORD_PREFIX + "*.json")))


def _load_records(paths) -> dict:
    """The verified shards of the record files `paths`; an unreadable one is ignored (its
    shards are verified again)."""
    known = {}
    for name in paths:
        try:
            with glam_files.open_file(name) as f:
                shards = json.load(f)["shards"]
            known.update({path: {"size": int(k["size"]), "mtime_ns": int(k["mtime_ns"])}
                          for path, k in shards.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logging.warning("Ignoring the unreadable record of verified shards %s (%s).",
                            name, e)
    return known


def record_path(record_dir: str, worker_index: int = 0) -> str:
    """This worker's record file of verified shards in `record_dir`."""
    return glam_files.join(record_dir, f"{RECORD_PREFIX}-worker{worker_index}.json")


def check_shards(files, *, record_dir: str | None = None, verify=None,
                 worker_index: int = 0) -> tuple:
    """Checks every TFRecord shard before it is read; returns a `framing.ShardReport` each.

    The framing (length CRCs, records inside the file) of every shard is checked in pure
    Python by seeking; the data CRCs of shards with intact framing by TensorFlow's C++
    reader (a full read, about disk speed); a shard with any damage is rescanned with the
    pure-Python data CRC (~16 MB/s) to name each bad record and resynchronise after it.
    Nothing here raises on damage.

    Args:
      files: the shards, in order (the reports keep it).
      record_dir: a folder for the record of verified shards (None: no record). A shard
        whose (absolute path, size, mtime_ns) is in a record file there (any worker's) skips
        the data read: its data CRCs verified before and it has not changed since. Shards
        verified now are added to this worker's record file (`record_path`), written
        crash-safely, so a restart reads each shard version's data once.
      verify: the shards whose data CRCs this worker reads when not recorded (None: all).
        The others get a framing-only report (under multi-worker, the shards other workers
        read; they verify them).
      worker_index: names this worker's record file (one writer per file).
    """
    start, reports = time.monotonic(), []
    files = list(files)
    verify = None if verify is None else {glam_files.absolute(p) for p in verify}
    known = load_verified(record_dir)
    own_path = record_path(record_dir, worker_index) if record_dir else None
    own = _load_records([own_path]) if own_path and glam_files.exists(own_path) else {}
    counts = {"now": 0, "recorded": 0, "others": 0}
    dirty, last_write = False, time.monotonic()
    for path in files:
        key_path = glam_files.absolute(path)
        key = _shard_key(path)  # before reading: a shard changed meanwhile is not recorded
        report = framing.scan_shard(path, check_data=False)
        if report.ok and known.get(key_path) == key:
            counts["recorded"] += 1
        elif report.ok and verify is not None and key_path not in verify:
            counts["others"] += 1
        else:
            counts["now"] += report.ok
            if report.ok and _tf_data_ok(path):
                own[key_path], dirty = key, True
            else:
                report = framing.scan_shard(path, check_data=True)
                dirty |= own.pop(key_path, None) is not None
            if own_path and dirty and time.monotonic() - last_write > _RECORD_EVERY_S:
                _write_record(own_path, own)
                dirty, last_write = False, time.monotonic()
        reports.append(report)
    if own_path and dirty:
        _write_record(own_path, own)
    logging.info("Checked %d TFRecord shards (%d bytes, %d valid records) in %.1f s: %d "
                 "damaged; data CRCs read now for %d intact shards, known from the record "
                 "for %d, left to other workers for %d.", len(reports),
                 sum(r.size for r in reports), sum(r.records for r in reports),
                 time.monotonic() - start, sum(not r.ok for r in reports), counts["now"],
                 counts["recorded"], counts["others"])
    return tuple(reports)


def _write_record(path: str, shards: dict) -> None:
    """Writes the record file `path` of verified shards (crash-safe)."""
    glam_files.makedirs(glam_files.dirname(path))
    glam_files.write_json_atomic(path, {"version": 1, "shards": shards})


def describe_damage(reports, *, source: str) -> str:
    """Lines naming every damaged file, offset and problem, and the totals, for `source`."""
    damaged = [r for r in reports if not r.ok]
    good = sum(r.records for r in reports)
    lines = [f"{len(damaged)} of {len(reports)} TFRecord shards of {source} are damaged "
             f"({sum(len(r.damage) for r in damaged)} spans, "
             f"{sum(r.damaged_bytes for r in damaged)} bytes; {good} valid records):"]
    lines += [r.describe() for r in damaged]
    return "\n".join(lines)


def readable_files(reports, *, skip_damaged: bool, clean_dir: str | None = None,
                   source: str = "the training data", flag: str = "skip_damaged_records"
                   ) -> list:
    """The files to read for `reports` (from `check_shards`), in the same order.

    Intact shards are read as they are. A damaged one is refused (DamagedShardsError listing
    every damaged shard) unless `skip_damaged`; then its valid records are copied once
    (crash-safe) into `clean_dir` and the copy is read instead: an ordinary TFRecord file,
    so file shuffling, sharding and iterator checkpoints work as for any shard. The copy's
    name holds a hash of the shard's path, size and modification time, so a restart reuses
    it and a replaced shard gets a new one.

    Args:
      reports: `check_shards` output.
      skip_damaged: read the valid records of damaged shards instead of refusing.
      clean_dir: folder of the clean copies; a new temporary folder when None.
      source, flag: named in the error (what was checked, the setting that skips damage).

    Raises:
      DamagedShardsError: a shard is damaged and `skip_damaged` is False.
    """
    damaged = [r for r in reports if not r.ok]
    if damaged and not skip_damaged:
        raise DamagedShardsError(
            describe_damage(reports, source=source) + f"\nReplace or repair these shards, "
            f"or set {flag} to train on their valid records, leaving out only the damaged "
            "spans.")
    if not damaged:
        return [r.path for r in reports]
    clean_dir = clean_dir or glam_files.scratch_dir("glam_tf_clean_shards_")
    glam_files.makedirs(clean_dir)
    files = []
    for report in reports:
        if report.ok:
            files.append(report.path)
            continue
        for line in report.describe().splitlines():
            logging.warning("Skipping damaged TFRecord span: %s", line)
        size, mtime_ns = glam_files.stat(report.path)
        key = hashlib.sha1(f"{glam_files.absolute(report.path)}|{size}|"
                           f"{mtime_ns}".encode()).hexdigest()[:12]
        clean = glam_files.join(clean_dir, f"{glam_files.basename(report.path)}.{key}.clean")
        if not glam_files.exists(clean):
            glam_files.atomic_write(clean, lambda out, r=report: _copy_spans(r, out))
        logging.warning("Reading %d valid records of %s from its clean copy %s.",
                        report.records, report.path, clean)
        files.append(clean)
    return files


def _copy_spans(report, out) -> None:
    """Writes the valid record spans of `report.path` to the binary file `out`."""
    with glam_files.open_file(report.path, "rb") as f:
        for start, end in report.spans:
            f.seek(start)
            while start < end:
                chunk = f.read(min(framing.CHUNK_BYTES, end - start))
                out.write(chunk)
                start += len(chunk)


def _try(fn, arg, fallback):
    """Runs `fn(arg)`; if it raises a TF runtime error, returns `fallback` instead.

    A one-element dataset with `ignore_errors`, followed by the fallback, `take(1)`: the error
    becomes a flag instead of ending the iteration, independent of element order.
    """
    good = tf.data.Dataset.from_tensors(arg).map(fn).ignore_errors()
    bad = tf.data.Dataset.from_tensors(fallback)
    return good.concatenate(bad).take(1).get_single_element()


def _make_parse_and_decode(max_decoded_pixels: int, num_classes: int | None,
                           skip_bad_labels: bool):
    """(index, serialized) -> (index, image uint8 (H, W, 3), label int64, id, ok bool).

    A record is not ok (dropped and counted) when it does not parse or decode, when its
    header declares more than `max_decoded_pixels` (refused before the decoder allocates
    it), or, with `skip_bad_labels`, when its label is outside [0, num_classes). Without
    `skip_bad_labels` such a label stops the stream with an error naming the record.
    """

    def parse_and_decode(s):
        f = records.parse_example(s)
        data, readable, pixels = encoded_image.decodable(f[records.KEY_ENCODED])
        checks = [tf.debugging.Assert(readable & (pixels <= max_decoded_pixels),
                                      ["unreadable header or too many pixels"])]
        if num_classes is not None and skip_bad_labels:
            label = f[records.KEY_LABEL]
            checks.append(tf.debugging.Assert((label >= 0) & (label < num_classes),
                                              ["label out of range"]))
        with tf.control_dependencies(checks):
            data = tf.identity(data)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, 3])
        # A 0-pixel image cannot be resized; treat it as undecodable.
        check = tf.debugging.assert_positive(tf.size(image), message="empty image")
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        return image, f[records.KEY_LABEL], f[records.KEY_ID], True

    def parse_and_decode_record(index, serialized):
        image, label, image_id, ok = _try(
            parse_and_decode, serialized,
            (tf.zeros([1, 1, 3], tf.uint8), tf.constant(-1, tf.int64), tf.constant(b""),
             tf.constant(False)))

        def id_of_failed_record():  # rare: find the id for the warning, if the record parses
            return _try(lambda s: records.parse_example(s)[records.KEY_ID], serialized,
                        tf.constant(b"<unparseable record>"))

        image_id = tf.cond(ok, lambda: image_id, id_of_failed_record)
        if num_classes is not None and not skip_bad_labels:
            in_range = tf.debugging.Assert(
                ~ok | ((label >= 0) & (label < num_classes)),
                [f"{PIPELINE_PREFIX} record id=", image_id, "at stream position", index,
                 "has label", label, f"outside [0, {num_classes}) (the number of classes); "
                 "fix the records or pass --skip_damaged_records to skip and count them."])
            with tf.control_dependencies([in_range]):
                label = tf.identity(label)
        return index, image, label, image_id, ok

    return parse_and_decode_record


def _make_counter(stats: DecodeStats, max_undecodable_run: int):
    """Counts each record; a run of `max_undecodable_run` dropped records in a row fails.

    A warning is logged for the first 10 drops and then at every power of two, so a set that
    is mostly damaged does not flood the log.
    """

    def count(index, image, label, image_id, ok):
        stats.examined.assign_add(1)
        dropped = stats.dropped.assign_add(tf.cast(tf.logical_not(ok), tf.int64))
        run = stats.undecodable_run.assign(
            tf.where(ok, tf.constant(0, tf.int64), stats.undecodable_run + 1))
        bounded = tf.debugging.Assert(run < max_undecodable_run, [
            PIPELINE_PREFIX, run, "records in a row could not be decoded or were "
            "dropped (the last: id=", image_id, "at stream position", index, "); stopping "
            f"instead of looping (DataConfig.max_undecodable_run={max_undecodable_run}). Are "
            "the records images (JPEG, PNG, GIF, BMP, WebP) under the pixel cap "
            "(max_decoded_pixels)?"])

        def warn():
            tf.print("glam_tf input pipeline: dropped record id=", image_id,
                     "at stream position", index, "(undecodable, over max_decoded_pixels or a "
                     "label out of range) - dropped so far:", dropped,
                     output_stream=sys.stderr)
            return tf.constant(0)

        is_power_of_two = tf.equal(tf.bitwise.bitwise_and(dropped, dropped - 1), 0)
        tf.cond(ok | ~((dropped <= 10) | is_power_of_two), lambda: tf.constant(0), warn)
        with tf.control_dependencies([bounded]):
            return index, tf.identity(image), label, image_id, ok

    return count


def _make_augment(config: DataConfig, sizes: tuple, num_input_pipelines: int,
                  input_pipeline_id: int):
    """Per-record augmentation, drawn from stateless RNG keyed by (seed, stream position)."""
    edges = tf.constant(config.aspect_edges, tf.float32)
    heights = tf.constant([h for _, h in sizes], tf.int32)
    widths = tf.constant([w for w, _ in sizes], tf.int32)

    def augment(index, image, label, image_id):
        shape = tf.shape(image)
        h, w = shape[0], shape[1]
        hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
        group = tf.reduce_sum(tf.cast(hf / wf >= edges, tf.int32))
        out_h, out_w = heights[group], widths[group]
        # Distinct streams per pipeline: position * num_pipelines + pipeline id.
        seed = tf.stack([tf.constant(config.seed, tf.int64),
                         index * num_input_pipelines + input_pipeline_id])
        u = tf.random.stateless_uniform([4], seed=seed, dtype=tf.float32)
        zoom = 1.0 + config.crop_scale * (2.0 * u[0] - 1.0)

        def zoom_in():  # a window of 1/zoom of the image side, inside the image
            ch = tf.clip_by_value(tf.cast(tf.round(hf / zoom), tf.int32), 1, h)
            cw = tf.clip_by_value(tf.cast(tf.round(wf / zoom), tf.int32), 1, w)
            top = tf.cast(tf.cast(h - ch, tf.float32) * u[1], tf.int32)
            left = tf.cast(tf.cast(w - cw, tf.float32) * u[2], tf.int32)
            crop = image[top:top + ch, left:left + cw]
            return tf.image.resize(crop, tf.stack([out_h, out_w]), method="bilinear")

        def zoom_out():  # the image shrinks to zoom of the frame; mean-colour border
            ih = tf.clip_by_value(tf.cast(tf.round(tf.cast(out_h, tf.float32) * zoom),
                                          tf.int32), 1, out_h)
            iw = tf.clip_by_value(tf.cast(tf.round(tf.cast(out_w, tf.float32) * zoom),
                                          tf.int32), 1, out_w)
            small = tf.image.resize(image, tf.stack([ih, iw]), method="bilinear")
            mean = tf.reduce_mean(tf.cast(image[::4, ::4], tf.float32), axis=[0, 1])
            top = tf.cast(tf.cast(out_h - ih, tf.float32) * u[1], tf.int32)
            left = tf.cast(tf.cast(out_w - iw, tf.float32) * u[2], tf.int32)
            padded = tf.pad(small - mean, [[top, out_h - ih - top], [left, out_w - iw - left],
                                           [0, 0]])
            return padded + mean

        out = tf.cond(zoom >= 1.0, zoom_in, zoom_out)
        delta = config.brightness * 255.0 * (2.0 * u[3] - 1.0)
        out = tf.saturate_cast(out + (delta + 0.5), tf.uint8)  # round, clip to [0, 255]
        out = tf.ensure_shape(out, [None, None, 3])
        return out, tf.cast(label, tf.int32), image_id, tf.cast(group, tf.int64)

    return augment


def build_train_dataset(config: DataConfig, *, num_input_pipelines: int = 1,
                        input_pipeline_id: int = 0, batch_size: int | None = None,
                        skip_examples: int = 0, stats: DecodeStats | None = None,
                        repeat: bool = True, with_ids: bool = False,
                        files=None, num_classes: int | None = None) -> tf.data.Dataset:
    """Builds this input pipeline's dataset of single-aspect-group training batches.

    Args:
      config: a `DataConfig`.
      num_input_pipelines / input_pipeline_id: from `tf.distribute.InputContext`. Files are
        split across pipelines when there are at least as many files as pipelines, else
        records are.
      batch_size: images per batch; default global_batch_size // num_input_pipelines (under
        `distribute_datasets_from_function` pass the per-replica size, see `make_dataset_fn`).
      skip_examples: records of THIS pipeline's stream to skip before decoding, to resume
        after a restart: steps_done * global_batch_size // num_input_pipelines.
      stats: a `DecodeStats` to count into; a fresh one when None (drops are logged anyway).
      repeat: True (training): loop forever, batches always full. False: one pass, the last
        batch of each group may be smaller, so no record is lost (for tests and checks).
      with_ids: also yield the image ids.
      files: the checked files to read, in order (`readable_files`); None checks the files
        matching `config.file_pattern` here (`check_shards`, then `readable_files` with
        `config.skip_damaged_records` and a temporary folder for clean copies).
      num_classes: when given, a record whose label is outside [0, num_classes) stops the
        stream with an error naming it, or with `config.skip_damaged_records` is dropped and
        counted.

    Returns:
      A dataset of (images float32 (B, H, W, 3) in [0, 255], labels int32 (B,)) — plus
      ids string (B,) with `with_ids` — where (W, H) is one of `config.scaled_bucket_sizes()`.

    Raises:
      ValueError: invalid config or arguments; FileNotFoundError: the pattern matches nothing;
      DamagedShardsError: a shard is damaged and `config.skip_damaged_records` is False.
    """
    config.validate()
    if num_input_pipelines < 1 or not 0 <= input_pipeline_id < num_input_pipelines:
        raise ValueError(
            f"input_pipeline_id must be in [0, num_input_pipelines), got {input_pipeline_id} "
            f"of {num_input_pipelines}")
    if batch_size is None:
        if config.global_batch_size % num_input_pipelines:
            raise ValueError(
                f"global_batch_size ({config.global_batch_size}) must be divisible by the "
                f"number of input pipelines ({num_input_pipelines})")
        batch_size = config.global_batch_size // num_input_pipelines
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if skip_examples < 0:
        raise ValueError(f"skip_examples must be >= 0, got {skip_examples}")
    stats = stats if stats is not None else DecodeStats()
    if files is None:
        files = glam_files.glob(config.file_pattern)
        if not files:
            raise FileNotFoundError(
                f"DataConfig.file_pattern {config.file_pattern!r} matches no file; "
                "expected TFRecords written by build_gldv2_main.py (e.g. "
                "<out>/train-*-of-*.tfrecord)")
        reports = check_shards(files)
        files = readable_files(reports, skip_damaged=config.skip_damaged_records,
                               source=f"DataConfig.file_pattern {config.file_pattern!r}",
                               flag="DataConfig.skip_damaged_records")
        stats.record_damage(reports)
    files = list(files)

    shard_records = len(files) < num_input_pipelines
    if not shard_records:
        files = files[input_pipeline_id::num_input_pipelines]
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16),
                       block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
    if shard_records:
        ds = ds.shard(num_input_pipelines, input_pipeline_id)
    ds = ds.shuffle(config.shuffle_buffer, seed=config.seed + 1, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()
    if skip_examples:
        ds = ds.skip(skip_examples)
    ds = ds.map(_make_parse_and_decode(config.max_decoded_pixels, num_classes,
                                       config.skip_damaged_records),
                num_parallel_calls=AUTOTUNE, deterministic=config.deterministic)
    ds = ds.map(_make_counter(stats, config.max_undecodable_run))
    ds = ds.filter(lambda index, image, label, image_id, ok: ok)
    ds = ds.map(lambda index, image, label, image_id, ok: (index, image, label, image_id))
    ds = ds.map(_make_augment(config, config.scaled_bucket_sizes(), num_input_pipelines,
                              input_pipeline_id),
                num_parallel_calls=AUTOTUNE, deterministic=config.deterministic)
    ds = ds.group_by_window(
        key_func=lambda image, label, image_id, group: group,
        reduce_func=lambda key, window: window.batch(batch_size, drop_remainder=repeat),
        window_size=batch_size)

    def finish(images, labels, ids, groups):
        images = tf.cast(images, tf.float32)
        return (images, labels, ids) if with_ids else (images, labels)

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = config.deterministic
    # The DecodeStats counters are the only stateful ops; leave them out of iterator
    # checkpoints instead of refusing to save (they are checkpointed with the stats object).
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    return ds.with_options(options)


def make_dataset_fn(config: DataConfig, *, steps_done: int = 0,
                    stats: DecodeStats | None = None, files=None):
    """A `dataset_fn(input_context)` for `strategy.distribute_datasets_from_function`.

    Each pipeline yields per-replica batches and skips the records it fed in `steps_done`
    steps (global_batch_size // num_input_pipelines per step). `files`: as in
    `build_train_dataset` (pass the checked files to check the shards once, not per pipeline).
    """

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(config.global_batch_size)
        skip = steps_done * (config.global_batch_size // ctx.num_input_pipelines)
        return build_train_dataset(
            config, num_input_pipelines=ctx.num_input_pipelines,
            input_pipeline_id=ctx.input_pipeline_id, batch_size=per_replica,
            skip_examples=skip, stats=stats, files=files)

    return dataset_fn


def count_records(file_pattern: str, *, skip_damaged: bool = False) -> int:
    """Number of valid records in the files matching `file_pattern` (`check_shards`).

    Raises DamagedShardsError naming every damaged span, unless `skip_damaged` (then the
    records of the damaged shards' valid spans are counted).
    """
    files = glam_files.glob(file_pattern)
    if not files:
        raise FileNotFoundError(f"{file_pattern!r} matches no file")
    reports = check_shards(files)
    if not skip_damaged and any(not r.ok for r in reports):
        raise DamagedShardsError(describe_damage(reports, source=repr(file_pattern)) +
                                 "\nPass skip_damaged=True to count their valid records.")
    return sum(r.records for r in reports)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps in one pass over `num_examples` records (at least 1)."""
    return max(1, math.ceil(num_examples / global_batch_size))
