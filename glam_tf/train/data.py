"""The training data of a run: this worker's dataset, the class count and the image count.

data_source "tfrecord" reads converter output (glam_tf.data.gldv2 writes summary.json
with the class and image counts next to the shards; without it the labels are scanned
once), "tfds" the same shards found through the folder's tensorflow-datasets metadata
(glam_tf.data.tfds_folder), "synthetic" first generates the synthetic landmarks when absent and converts them
(the demo), "random" is the file-less stand-in of glam_tf.train.random_data.

TFRecord shards are checked before anything else reads them (framing and data CRCs,
glam_tf.data.pipeline.check_shards): a damaged shard stops the run before the model is
built, with every file, offset and problem named, unless --skip_damaged_records, which
reads clean copies of the damaged shards' valid records (kept in <train_dir>/data_check/).
The data CRCs are read once per shard version: shards that verified are recorded (path,
size, mtime) in <train_dir>/data_check/verified_shards-worker<k>.json, and a restart only
re-checks their framing. Under multi-worker training each worker reads the data of the
shards it trains on (see `data_verified_here`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import tensorflow as tf
from absl import logging

from glam_tf import files as glam_files
from glam_tf.config import contract
from glam_tf.config.train import TrainConfig
from glam_tf.refusal import BadInput, Refused
from glam_tf.train.distribute import WorkerInfo
from glam_tf.train.random_data import random_train_dataset



class TrainingDataError(BadInput, ValueError):
    """Training records that cannot be trained on (none, or labels out of range), found
    before the model is built; the message names the pattern, file and record."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    """This worker's training stream and what the run needs to know about the data.

    Attributes:
        dataset: endless (images float32 (b, H, W, 3), labels int32 (b,)) with b the
            worker's share of the global batch; its plain iterator is checkpointable.
        num_classes: ArcFace classes.
        num_examples: training images (0 for the random stand-in).
        description: one line for the log.
        decode_stats: glam_tf.data.pipeline.DecodeStats counting undecodable records and
            the damaged spans left out (checkpointed with the iterator), or None for the
            random stand-in.
        shard_reports: glam_tf.data.framing.ShardReport of every shard checked (empty for
            the random stand-in).
    """

    dataset: tf.data.Dataset
    num_classes: int
    num_examples: int
    description: str
    decode_stats: Optional[tf.Module] = None
    shard_reports: tuple = ()


def count_records(files: list, file_pattern: str, *, num_classes: int = 0,
                  skip_bad_labels: bool = False) -> tuple:
    """(num_examples, num_classes) of the checked TFRecord `files` (those to be read).

    Reads the converter's summary.json beside the shards when every shard is in one
    folder and `files` are exactly its train pattern's files (so not when clean copies
    replace damaged shards); otherwise scans the labels (one pass over the records, no
    image decoding). `file_pattern` is named in the log.

    The scan refuses a label outside [0, num_classes) (num_classes 0: the labels found,
    so only negative ones) naming the file and the record, unless `skip_bad_labels`: then
    they are counted and logged (the input pipeline drops them).
    """
    if not files:
        raise TrainingDataError(f"--train_file_pattern={file_pattern!r} matches no file.")
    files = list(files)
    folders = {glam_files.dirname(f) for f in files}
    if len(folders) == 1:
        folder = folders.pop()
        summary_path = glam_files.join(folder, contract.CONVERTER_SUMMARY_FILE)
        if glam_files.isfile(summary_path):
            summary = glam_files.read_json(summary_path)
            train_pattern = summary.get("train_pattern", "")  # relative to the folder
            if train_pattern and glam_files.glob(
                    glam_files.join(folder, train_pattern)) == sorted(files):
                return int(summary["written"]["train"]), int(summary["num_classes"])
    from glam_tf.data.records import KEY_LABEL  # noqa: PLC0415 (only for the scan)

    spec = {KEY_LABEL: tf.io.FixedLenFeature([], tf.int64)}
    count, top, bad, first_bad = 0, -1, 0, None
    for path in files:
        labels = (tf.data.TFRecordDataset(path)
                  .map(lambda s: tf.io.parse_single_example(s, spec)[KEY_LABEL])
                  .batch(4096))
        offset = 0
        for batch in labels.as_numpy_iterator():
            wrong = (batch < 0) | ((batch >= num_classes) if num_classes else False)
            if wrong.any():
                bad += int(wrong.sum())
                if first_bad is None:
                    k = int(wrong.argmax())
                    first_bad = (path, offset + k, int(batch[k]))
            good = batch[~wrong]
            top = max(top, int(good.max())) if good.size else top
            count += len(batch)
            offset += len(batch)
    if first_bad is not None:
        path, record, label = first_bad
        rule = f"[0, {num_classes})" if num_classes else ">= 0"
        message = (f"{bad} record(s) of {file_pattern} have a label outside {rule}; the first: "
                   f"record {record} of {path} (label {label})")
        if not skip_bad_labels:
            raise TrainingDataError(message + ". Fix the records, or pass "
                                    "--skip_damaged_records to skip and count them.")
        logging.warning("%s: skipped (--skip_damaged_records).", message)
        count -= bad
    logging.info("Scanned %d records of %s: labels 0..%d.", count, file_pattern, top)
    return count, top + 1


def tfds_train_pattern(folder: str) -> str:
    """The glob of the 'train' shards of the TFDS folder `folder` (the converter's output),
    after checking that the files its dataset_info.json names are exactly those there.

    Raises:
      Refused: the metadata names files that are absent, or the folder holds others.
    """
    from glam_tf.data import gldv2, tfds_folder  # noqa: PLC0415

    named, _ = tfds_folder.split_files(folder, "train")
    pattern = glam_files.join(folder, gldv2.TRAIN_PATTERN)
    there = glam_files.glob(pattern)
    if sorted(named) != there:
        absent = sorted(set(named) - set(there))
        raise Refused(glam_files.join(folder, tfds_folder.INFO_FILE),
                      f"names {len(named)} 'train' shards but {len(there)} match "
                      f"{gldv2.TRAIN_PATTERN} there"
                      + (f" (first absent: {absent[0]})" if absent else ""),
                      "rerun the converter into that folder (it rewrites the metadata)")
    return pattern


def data_verified_here(shards: list, worker: WorkerInfo, data_config) -> list | None:
    """The shards whose data CRCs this worker reads (None: all of them).

    Under multi-worker training with at least as many shards as workers, each input
    pipeline reads the fixed share shards[worker_index::num_workers] of the checked files
    (`build_train_dataset` splits files before shuffling them), so a worker verifies only
    its share; the framing of every shard is still checked by every worker. With
    skip_damaged_records every worker verifies all shards: the image and class counts come
    from the files actually read, so every worker must see the same damage. With fewer
    shards than workers the records are split, so every worker reads every shard.
    """
    if (worker.num_workers == 1 or data_config.skip_damaged_records
            or len(shards) < worker.num_workers):
        return None
    return shards[worker.worker_index::worker.num_workers]


def prepare(config: TrainConfig, worker: WorkerInfo) -> DataSource:
    """Builds this worker's DataSource for `config` (generating/converting data if asked)."""
    if config.data_source == "random":
        dataset = random_train_dataset(
            global_batch_size=config.global_batch_size, image_size=config.random_image_size,
            num_classes=config.num_classes, seed=config.seed,
            num_input_pipelines=worker.num_workers, input_pipeline_id=worker.worker_index)
        return DataSource(dataset, config.num_classes, 0,
                          f"random stand-in {config.random_image_size[0]}x"
                          f"{config.random_image_size[1]}")
    data_config = config.data
    if config.data_source == "synthetic":
        from glam_tf.train.synthetic import prepare_synthetic  # noqa: PLC0415

        if worker.num_workers > 1:
            raise ValueError("--data_source=synthetic runs on one worker; generate and "
                             "convert the set first, then train multi-worker with "
                             "--data_source=tfrecord --train_file_pattern=<root>/tfrecord/"
                             "train-*-of-*.tfrecord.")
        pattern = prepare_synthetic(config.synthetic)
        data_config = dataclasses.replace(data_config, file_pattern=pattern)
    if config.data_source == "tfds":
        data_config = dataclasses.replace(data_config, file_pattern=tfds_train_pattern(
            config.tfds_dir))
    from glam_tf.data import pipeline  # noqa: PLC0415

    check_dir = contract.data_check_dir(config.train_dir)
    shards = sorted(glam_files.glob(data_config.file_pattern))
    folders = [p for p in shards if glam_files.isdir(p)]
    if folders:
        raise Refused(folders[0], f"--train_file_pattern={data_config.file_pattern!r} matches "
                      f"this directory ({len(folders)} of its {len(shards)} matches are "
                      "directories)", "make the pattern match the TFRecord files only, e.g. "
                      "<dir>/train-*-of-*.tfrecord")
    reports = pipeline.check_shards(
        shards, record_dir=check_dir, verify=data_verified_here(shards, worker, data_config),
        worker_index=worker.worker_index)
    files = pipeline.readable_files(
        reports, skip_damaged=data_config.skip_damaged_records, clean_dir=check_dir,
        source=f"--train_file_pattern={data_config.file_pattern}",
        flag="--skip_damaged_records")
    num_examples, found_classes = count_records(
        files, data_config.file_pattern, num_classes=config.num_classes,
        skip_bad_labels=data_config.skip_damaged_records)
    if num_examples <= 0:
        raise TrainingDataError(
            f"--train_file_pattern={data_config.file_pattern!r}: its {len(files)} shard(s) "
            f"({files[0]}{', ...' if len(files) > 1 else ''}) hold no record to train on. "
            "Point it at the shards build_gldv2_main.py wrote, or rerun that conversion.")
    num_classes = config.num_classes or found_classes
    if num_classes < found_classes:
        raise TrainingDataError(f"--num_classes={num_classes} but the records of "
                         f"{data_config.file_pattern} have labels up to {found_classes - 1}.")
    stats = pipeline.DecodeStats()
    dataset = pipeline.build_train_dataset(
        data_config, num_input_pipelines=worker.num_workers,
        input_pipeline_id=worker.worker_index, stats=stats, files=files,
        num_classes=num_classes)
    return DataSource(dataset, num_classes, num_examples,
                      f"{num_examples} images in {data_config.file_pattern}", stats, reports)
