"""Google Landmarks v2 (GLDv2) as downloaded -> sharded DELG-keyed TFRecords.

Input layout (what https://github.com/cvdfoundation/google-landmark gives):
  <root>/train_clean.csv   columns `landmark_id,images` (images: space-separated ids), or
  <root>/train.csv         columns `id,url,landmark_id`
  <root>/train/<a>/<b>/<c>/<id>.jpg   with a, b, c the first three characters of the id.

Output (in `output_dir`):
  train-00000-of-000NN.tfrecord ...       the training shards (seeded shuffle across shards)
  validation-00000-of-000MM.tfrecord ...  optional per-class validation split
  label_map.csv                           label,landmark_id,num_images (label = class index)
  summary.json, missing_images.txt, undecodable_images.txt
  missing_by_tar.txt                      tar<TAB>id<TAB>path of each image absent when
                                          planning (only with allow_missing)
  conversion_plan.json                    what a resumed run must match
  dataset_info.json, features.json        tensorflow-datasets metadata: the folder is also a
                                          TFDS dataset (glam_tf.data.tfds_folder)

Completeness is checked before anything is converted: images listed in the csv but absent
refuse the run (`MissingImagesError`, one line; the list goes to missing_by_tar.txt, each id
with the tar that holds it when glam_tf.data.download recorded the tars' members under
`<root>/archive_members/`) unless `allow_missing`, which converts the rest and counts them
in summary.json. `exclude_landmarks` names a file of landmark ids left out (e.g. those also in
the test sets); summary.json records its sha256 and what was left out.

The conversion is one Apache Beam pipeline (`convert_gldv2`): this process reads the csv,
checks which files are there and plans the shards (labels, split, shuffle: cheap, and what
makes the output deterministic); the pipeline then writes the shards in parallel (one
element per shard: read, validate, encode, write), counts written, missing and undecodable
images with Beam counters (namespace `glam_gldv2`) and writes the lists and summary.json. By
default it runs on the local runner's worker processes (glam_tf.beam_options); any runner's
options pass through (`beam_args`). Each shard is written to a temporary name and renamed when
complete, after its report, so a re-run skips finished shards and redoes interrupted ones. The
output folder must be one every worker can write (a local disk for the local runner, a
shared file system for a cluster).
"""

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re

import apache_beam as beam
import numpy as np
from absl import logging

from glam_tf import beam_options, files
from glam_tf.config import contract
from glam_tf.data import download, tfds_folder

CSV_CLEAN = "train_clean.csv"
CSV_FULL = "train.csv"
CSV_CLEAN_HEADER = ("landmark_id", "images")
CSV_FULL_HEADER = ("id", "url", "landmark_id")
IMAGE_DIR_NAME = "train"
LABEL_MAP_NAME = "label_map.csv"
PLAN_NAME = "conversion_plan.json"
TRAIN_PATTERN = "train-*-of-*.tfrecord"
VALIDATION_PATTERN = "validation-*-of-*.tfrecord"
MISSING_NAME = "missing_images.txt"
MISSING_BY_TAR_NAME = "missing_by_tar.txt"
UNDECODABLE_NAME = "undecodable_images.txt"
REPORT_DIR = ".shard_reports"
TASK_DIR = "tasks"  # under REPORT_DIR: each shard's entries, read by the worker writing it
PLAN_MISSING_NAME = "plan_missing.json"  # under REPORT_DIR: files absent when planning
COUNTERS = "glam_gldv2"  # Beam counter namespace: images_written/_missing/_undecodable
IMAGES_PER_SHARD = 10000

LAYOUT_HELP = (
    "Put the Google Landmarks v2 training set (https://github.com/cvdfoundation/google-landmark) "
    "in this layout:\n"
    "  {root}/train_clean.csv  (columns: landmark_id,images  -- images = space-separated ids), or\n"
    "  {root}/train.csv        (columns: id,url,landmark_id)\n"
    "  {root}/train/<a>/<b>/<c>/<id>.jpg   (a, b, c = the first three characters of the id; "
    "this is what extracting the images_*.tar files into {root}/train gives)"
)

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{3,}$")


@dataclasses.dataclass(frozen=True)
class GLDv2Image:
    """One csv row: an image id and the landmark (original GLDv2 id) it shows."""

    image_id: str
    landmark_id: int


@dataclasses.dataclass
class ConversionSummary:
    """What `convert_gldv2` did, also written to `<output_dir>/summary.json` (there the
    patterns and the label map are named relative to that folder, so the file is the same
    wherever the output goes, and stays right when the folder is moved or copied).

    Attributes:
      written: examples in the TFRecords, per split ("train", "validation").
      missing: ids listed in the csv whose file is absent.
      undecodable: ids whose file Pillow cannot decode (with the reason).
      num_classes: N, the labels run 0..N-1 (classes with at least one present file).
      train_pattern / validation_pattern: globs for `DataConfig.file_pattern`.
      label_map_path: label -> landmark id csv.
      shards_skipped: finished shards a resumed run left as they were.
      missing_by_tar: tar name -> images absent when planning (allow_missing runs; "unknown"
        for ids in none of the recorded tars); in summary.json when not empty.
      excluded: what `exclude_landmarks` left out (file, sha256, landmarks, images); in
        summary.json when a list was given.
      counters: this run's Beam counters (images_written, images_missing,
        images_undecodable, shards_written); not in summary.json.
    """

    written: dict
    missing: list
    undecodable: list
    num_classes: int
    train_pattern: str
    validation_pattern: str
    label_map_path: str
    shards_skipped: int = 0
    missing_by_tar: dict = dataclasses.field(default_factory=dict)
    excluded: dict = dataclasses.field(default_factory=dict)
    counters: dict = dataclasses.field(default_factory=dict)

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    def to_json(self) -> dict:
        """summary.json's content: counts, and the paths as names inside the output folder."""
        optional = {"missing_by_tar": dict(self.missing_by_tar), "excluded": dict(self.excluded)}
        return {k: v for k, v in optional.items() if v} | {
            "written": dict(self.written),
            "total_written": self.total_written,
            "missing": len(self.missing),
            "undecodable": len(self.undecodable),
            "num_classes": self.num_classes,
            "train_pattern": files.basename(self.train_pattern),
            "validation_pattern": files.basename(self.validation_pattern),
            "label_map_path": files.basename(self.label_map_path),
            "shards_skipped": self.shards_skipped,
        }


def train_image_dir(root: str) -> str:
    """`<root>/train`, the folder the GLDv2 images are extracted into."""
    return files.join(root, IMAGE_DIR_NAME)


def gldv2_image_path(image_dir: str, image_id: str) -> str:
    """`<image_dir>/<a>/<b>/<c>/<id>.jpg` for a GLDv2 id (a, b, c its first three characters)."""
    return files.join(image_dir, image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def write_clean_csv(path: str, rows) -> None:
    """Writes a train_clean.csv: the `landmark_id,images` header, then one line per
    (landmark_id, [image ids]) of `rows`, the ids space-separated (atomic)."""
    text = ",".join(CSV_CLEAN_HEADER) + "\n" + "".join(
        f"{landmark_id},{' '.join(ids)}\n" for landmark_id, ids in rows)
    files.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def find_gldv2_csv(root: str, csv_path: str | None = None) -> str:
    """Returns the csv to read: `csv_path` if given, else train_clean.csv, else train.csv.

    Raises:
      FileNotFoundError: with the expected layout, when neither is there.
    """
    if csv_path:
        if not files.isfile(csv_path):
            raise FileNotFoundError(
                f"GLDv2 csv {csv_path!r} does not exist.\n" + LAYOUT_HELP.format(root=root))
        return csv_path
    for name in (CSV_CLEAN, CSV_FULL):
        path = files.join(root, name)
        if files.isfile(path):
            return path
    raise FileNotFoundError(
        f"No GLDv2 csv under {root!r}: expected {CSV_CLEAN} or {CSV_FULL} there.\n"
        + LAYOUT_HELP.format(root=root))


def _check_id(image_id: str, csv_path: str, line: int) -> str:
    if not _ID_RE.match(image_id):
        raise ValueError(
            f"{csv_path}:{line}: image id {image_id!r} is not a GLDv2 id (expected at least 3 "
            "characters from [A-Za-z0-9_-], e.g. 16 hex digits)")
    return image_id


def _check_landmark(value: str, csv_path: str, line: int) -> int:
    try:
        landmark = int(value)
    except ValueError:
        raise ValueError(
            f"{csv_path}:{line}: landmark_id {value!r} is not an integer") from None
    if landmark < 0:
        raise ValueError(f"{csv_path}:{line}: landmark_id {landmark} is negative")
    return landmark


def read_gldv2_csv(csv_path: str) -> list:
    """Reads train_clean.csv (landmark_id,images) or train.csv (id,url,landmark_id).

    The format is recognised from the header. A repeated image id keeps its first row (a
    warning gives the count).

    Returns:
      list of `GLDv2Image`, in file order.

    Raises:
      ValueError: unknown header, bad id or landmark id (message names file and line).
    """
    images = []
    seen = set()
    duplicates = 0
    with files.open_file(csv_path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path} is empty; expected a header line "
                             "'landmark_id,images' or 'id,url,landmark_id'")
        header = tuple(h.strip() for h in header)
        if header == CSV_CLEAN_HEADER:
            def rows():
                for line, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) != 2:
                        raise ValueError(f"{csv_path}:{line}: expected 2 columns "
                                         f"(landmark_id,images), got {len(row)}")
                    landmark = _check_landmark(row[0], csv_path, line)
                    for image_id in row[1].split():
                        yield _check_id(image_id, csv_path, line), landmark
        elif header == CSV_FULL_HEADER:
            def rows():
                for line, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) != 3:
                        raise ValueError(f"{csv_path}:{line}: expected 3 columns "
                                         f"(id,url,landmark_id), got {len(row)}")
                    yield (_check_id(row[0].strip(), csv_path, line),
                           _check_landmark(row[2], csv_path, line))
        else:
            raise ValueError(
                f"{csv_path}: header {','.join(header)!r} is neither 'landmark_id,images' "
                "(train_clean.csv) nor 'id,url,landmark_id' (train.csv)")
        for image_id, landmark in rows():
            if image_id in seen:
                duplicates += 1
                continue
            seen.add(image_id)
            images.append(GLDv2Image(image_id, landmark))
    if duplicates:
        logging.warning("%s: %d repeated image ids ignored (first row kept)", csv_path,
                        duplicates)
    return images


def build_label_map(landmark_ids) -> dict:
    """Maps each distinct landmark id to a label 0..N-1, in increasing landmark-id order."""
    return {int(lm): label for label, lm in enumerate(sorted(set(int(x) for x in landmark_ids)))}


def write_label_map(path: str, label_map: dict, counts: dict) -> None:
    """Writes `label,landmark_id,num_images` rows, sorted by label."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["label", "landmark_id", "num_images"])
    for landmark, label in sorted(label_map.items(), key=lambda kv: kv[1]):
        writer.writerow([label, landmark, counts.get(landmark, 0)])
    files.atomic_write(path, lambda f: f.write(rows.getvalue().encode("utf-8")))


def read_label_map(path: str) -> np.ndarray:
    """Reads label_map.csv; returns int64 (N,) landmark ids indexed by label.

    `read_label_map(p)[k]` is the GLDv2 landmark id of the trained model's class k.
    """
    with files.open_file(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"label", "landmark_id"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns label,landmark_id[,num_images], got "
                             f"{reader.fieldnames}")
        pairs = sorted((int(r["label"]), int(r["landmark_id"])) for r in reader)
    labels = [p[0] for p in pairs]
    if labels != list(range(len(labels))):
        raise ValueError(f"{path}: labels are not exactly 0..{len(labels) - 1}")
    return np.array([p[1] for p in pairs], dtype=np.int64)


def split_per_class(labels: np.ndarray, fraction: float, seed: int):
    """Seeded per-class split: about `fraction` of each class goes to validation.

    A class of n images gives floor(n * fraction + 0.5) to validation, at most n - 1, so every
    class keeps at least one training image (a class of one image stays whole).

    Args:
      labels: int (M,) class of each image.
      fraction: in [0, 1).
      seed: the split's seed.

    Returns:
      (train_indices, validation_indices), sorted int64 arrays partitioning 0..M-1.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    if fraction == 0.0 or labels.size == 0:
        return np.arange(labels.size, dtype=np.int64), np.zeros([0], np.int64)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    val = []
    for group in np.split(order, boundaries):
        n_val = min(int(math.floor(len(group) * fraction + 0.5)), len(group) - 1)
        if n_val > 0:
            val.append(rng.choice(group, size=n_val, replace=False))
    val = np.sort(np.concatenate(val)) if val else np.zeros([0], np.int64)
    mask = np.ones(labels.size, bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)


class MissingImagesError(FileNotFoundError):
    """Images the csv lists are absent (the run refuses unless allow_missing)."""


def read_landmark_list(path: str) -> tuple:
    """Reads a file of landmark ids, one per line ('#' starts a comment, blank lines skipped).

    Returns:
      (sorted unique ids, sha256 hex digest of the file's bytes).

    Raises:
      FileNotFoundError: no such file. ValueError: a line that is not an integer (names the
        file and line).
    """
    if not files.isfile(path):
        raise FileNotFoundError(f"--exclude_landmarks={path}: no such file")
    data = files.read_bytes(path)
    ids = set()
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            ids.add(_check_landmark(text, path, line_no))
    return tuple(sorted(ids)), hashlib.sha256(data).hexdigest()


def tars_holding(root: str, image_ids) -> tuple:
    """Which GLDv2 tar holds each id, from the member lists glam_tf.data.download writes
    (`<root>/archive_members/images_NNN.tar.txt`; GLDv2 publishes no id -> tar map).

    Returns:
      ({id: tar name} for the ids found, sorted names of the tars with a member list).
    """
    folder = files.join(root, download.MEMBERS_DIR)
    if not files.isdir(folder):
        return {}, []
    wanted, found, tars = set(image_ids), {}, []
    for name in files.listdir(folder):
        if not name.endswith(".tar.txt"):
            continue
        tar = name[:-len(".txt")]
        tars.append(tar)
        for line in files.read_text(files.join(folder, name)).splitlines():
            image_id = files.splitext(files.basename(line))[0]
            if image_id in wanted:
                found[image_id] = tar
    return found, sorted(tars)


def _missing_report(root: str, missing: list, output_dir: str) -> tuple:
    """Writes missing_by_tar.txt for the absent (image, path) pairs; returns ({tar: count},
    a phrase saying where the first one is and which tars are not extracted)."""
    found, tars = tars_holding(root, [im.image_id for im, _ in missing])
    unknown = "unknown"
    rows = sorted((found.get(im.image_id, unknown), im.image_id, path) for im, path in missing)
    files.write_text_atomic(files.join(output_dir, MISSING_BY_TAR_NAME),
                            "".join(f"{t}\t{i}\t{p}\n" for t, i, p in rows))
    counts = {}
    for tar, _, _ in rows:
        counts[tar] = counts.get(tar, 0) + 1
    first = missing[0][0].image_id
    if first in found:
        where = f"{first} is in {found[first]}"
    elif tars:
        absent = [f"images_{i:03d}.tar" for i in range(download.GLDV2_TARS)
                  if f"images_{i:03d}.tar" not in tars]
        where = (f"{first} is in none of the {len(tars)} extracted tars; not extracted: "
                 f"{', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''} "
                 f"({len(absent)} tars)")
    else:
        where = (f"{first}'s tar is not known (no {download.MEMBERS_DIR}/ under {root}: "
                 "glam-download records each tar's members there)")
    return counts, where


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`train-00003-of-00128.tfrecord`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


# ---------------------------------------------------------------------------- pipeline


class _WriteShard(beam.DoFn):
    """Writes one shard (temporary name, report, rename); emits (split, report).

    The element is the shard's file name; its entries are in `<output>/.shard_reports/tasks/`,
    written by the planner, so the pipeline graph stays small for millions of images.
    """

    def __init__(self, output_dir: str, full_decode: bool):
        super().__init__()
        self._output_dir = output_dir
        self._full_decode = full_decode
        self._written = beam.metrics.Metrics.counter(COUNTERS, "images_written")
        self._missing = beam.metrics.Metrics.counter(COUNTERS, "images_missing")
        self._undecodable = beam.metrics.Metrics.counter(COUNTERS, "images_undecodable")
        self._shards = beam.metrics.Metrics.counter(COUNTERS, "shards_written")

    def setup(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def process(self, name):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top  (worker processes)

        from glam_tf.data import records  # pylint: disable=g-import-not-at-top

        task_path = files.join(self._output_dir, REPORT_DIR, TASK_DIR, name + ".json")
        with files.open_file(task_path) as f:
            task = json.load(f)
        out_path = files.join(self._output_dir, name)
        # Unique per host, process and attempt: a retried or speculative attempt of the same
        # shard never writes into another's file; the rename makes one of them the shard.
        tmp_path = files.temporary_path(out_path)
        report = {"shard": name, "written": 0, "missing": [], "undecodable": []}
        try:
            with tf.io.TFRecordWriter(tmp_path) as writer:
                for image_id, label, path in task["entries"]:
                    try:
                        with files.open_file(path, "rb") as f:
                            data = f.read()
                    except FileNotFoundError:
                        report["missing"].append([image_id, path])
                        self._missing.inc()
                        continue
                    try:
                        info = records.probe_image(data, full_decode=self._full_decode)
                    except records.UndecodableImageError as e:
                        report["undecodable"].append([image_id, path, str(e)])
                        self._undecodable.inc()
                        continue
                    example = records.make_example(encoded=data, image_id=image_id,
                                                   label=label, info=info)
                    writer.write(example.SerializeToString(deterministic=True))
                    report["written"] += 1
                    self._written.inc()
            files.write_json_atomic(_report_path(self._output_dir, name), report)
            files.rename(tmp_path, out_path)
        finally:
            if files.exists(tmp_path):
                files.remove(tmp_path)
        files.remove(task_path)
        self._shards.inc()
        yield task["split"], report


def _report_path(output_dir: str, name: str) -> str:
    return files.join(output_dir, REPORT_DIR, name + ".json")


def _finalize(_, *, output_dir: str, shards, num_classes: int, label_map_path: str,
              skipped: int, missing_by_tar: dict, excluded: dict) -> dict:
    """Gathers every shard's report (written now or before) into the lists and summary.json.

    Runs once, after every shard (its input is the list of this run's reports).
    """
    with files.open_file(files.join(output_dir, REPORT_DIR, PLAN_MISSING_NAME)) as f:
        plan_missing = [tuple(m) for m in json.load(f)]
    beam.metrics.Metrics.counter(COUNTERS, "images_missing").inc(len(plan_missing))
    written = {"train": 0, "validation": 0}
    worker_missing, undecodable = [], []
    for split, name in shards:
        with files.open_file(_report_path(output_dir, name)) as f:
            report = json.load(f)
        written[split] += report["written"]
        worker_missing.extend(tuple(m) for m in report["missing"])
        undecodable.extend(tuple(u) for u in report["undecodable"])
    all_missing = sorted(plan_missing + worker_missing)
    undecodable.sort()
    files.atomic_write(files.join(output_dir, MISSING_NAME), lambda f: f.write("".join(
        f"{image_id}\t{path}\n" for image_id, path in all_missing).encode("utf-8")))
    files.atomic_write(files.join(output_dir, UNDECODABLE_NAME), lambda f: f.write("".join(
        f"{image_id}\t{path}\t{reason}\n" for image_id, path, reason in undecodable
    ).encode("utf-8")))
    summary = ConversionSummary(
        written=written, missing=all_missing, undecodable=undecodable,
        num_classes=num_classes,
        train_pattern=files.join(output_dir, TRAIN_PATTERN),
        validation_pattern=files.join(output_dir, VALIDATION_PATTERN),
        label_map_path=label_map_path, shards_skipped=skipped,
        missing_by_tar=missing_by_tar, excluded=excluded)
    files.write_json_atomic(files.join(output_dir, contract.CONVERTER_SUMMARY_FILE),
                            summary.to_json())
    return summary.to_json()


# ---------------------------------------------------------------------------- driver


def _plan_shards(num_images: int, num_shards: int) -> int:
    if num_images == 0:
        return 0
    if num_shards > 0:
        return min(num_shards, num_images)
    return max(1, math.ceil(num_images / IMAGES_PER_SHARD))


def _check_plan(plan_path: str, plan: dict) -> None:
    if not files.exists(plan_path):
        files.write_json_atomic(plan_path, plan)
        return
    with files.open_file(plan_path) as f:
        old = json.load(f)
    diff = sorted(k for k in set(plan) | set(old) if plan.get(k) != old.get(k))
    if diff:
        details = "; ".join(f"{k}: before {old.get(k)!r}, now {plan.get(k)!r}" for k in diff)
        raise ValueError(
            f"{files.dirname(plan_path)} holds shards of a different conversion ({details}). "
            "Resuming needs the same csv, present images, shard counts, validation fraction and "
            "seed; use a new output directory or delete that one.")


def _exclude_landmarks(images, path):
    """(images without the landmarks listed in the file `path`, the summary's record of
    what was left out: the list's name and sha256, the landmarks and images removed)."""
    if not path:
        return images, {}
    listed, digest = read_landmark_list(path)
    drop = set(listed)
    left_out = sorted({im.landmark_id for im in images} & drop)
    kept = [im for im in images if im.landmark_id not in drop]
    logging.info("%s: left out %d landmarks (%d images) of the %d listed",
                 path, len(left_out), len(images) - len(kept), len(listed))
    return kept, {"file": files.basename(path), "sha256": digest,
                  "landmarks_listed": len(listed), "landmarks_left_out": left_out,
                  "images_left_out": len(images) - len(kept)}


def _present_images(images, *, root, csv_path, image_dir, output_dir, allow_missing):
    """Which listed images are there: (present, missing) as (image, path) pairs and the
    missing counts by tar. Labels are drawn over present images only, so a partial download
    does not create classes without a single example.

    Raises:
      FileNotFoundError: none is there.
      MissingImagesError: some are missing and not `allow_missing` (missing_by_tar.txt in
        `output_dir` lists them).
    """
    present, missing = [], []
    for im in images:
        path = gldv2_image_path(image_dir, im.image_id)
        (present if files.exists(path) else missing).append((im, path))
    if not present:
        first = gldv2_image_path(image_dir, images[0].image_id) if images else "-"
        raise FileNotFoundError(
            f"None of the {len(images)} images listed in {csv_path} is under {image_dir!r} "
            f"(first expected: {first}).\n" + LAYOUT_HELP.format(root=root))
    missing_by_tar = {}
    if missing:
        files.makedirs(output_dir)
        missing_by_tar, where = _missing_report(root, missing, output_dir)
        if not allow_missing:
            raise MissingImagesError(
                f"{len(missing)} of the {len(images)} images listed in {csv_path} are "
                f"missing under {image_dir} ({where}; all in "
                f"{files.join(output_dir, MISSING_BY_TAR_NAME)}): rerun glam-download, or "
                "pass --allow_missing to convert without them")
        logging.warning("%d images listed in %s are missing (by tar: %s); converting the rest "
                        "(--allow_missing)", len(missing), csv_path, missing_by_tar)
    return present, missing, missing_by_tar


def convert_gldv2(root: str, output_dir: str, *, csv_path: str | None = None,
                  image_dir: str | None = None, num_shards: int = 0,
                  num_validation_shards: int = 0, validation_fraction: float = 0.0,
                  seed: int = 0, full_decode: bool = True, allow_missing: bool = False,
                  exclude_landmarks: str | None = None,
                  beam_args=None) -> ConversionSummary:
    """Converts GLDv2 as downloaded into sharded DELG-keyed TFRecords (Beam, resumable).

    Args:
      root: the GLDv2 folder (csv and `train/` inside, see module docstring).
      output_dir: where shards, label map and reports go (created).
      csv_path: a csv other than `<root>/train_clean.csv` / `<root>/train.csv`.
      image_dir: image root other than `<root>/train`.
      num_shards / num_validation_shards: shard counts; 0 = about 10,000 images per shard.
      validation_fraction: per-class fraction held out into `validation-*` shards, in [0, 1).
      seed: shuffles images across shards and draws the validation split.
      full_decode: decode every pixel to catch truncated files (else read headers only).
      allow_missing: convert even when images listed in the csv are absent (counted in
        summary.json, listed in missing_images.txt and missing_by_tar.txt); else refuse.
      exclude_landmarks: a file of landmark ids to leave out (`read_landmark_list`).
      beam_args: Beam pipeline flags (runner and its options, glam_tf.beam_options); None =
        the DirectRunner with 2 worker processes.

    Returns:
      A `ConversionSummary` (also in summary.json, less the counters). Missing and
      undecodable images are skipped, counted and listed in missing_images.txt /
      undecodable_images.txt.

    Raises:
      FileNotFoundError: no csv or no image folder (the message shows the expected layout).
      MissingImagesError: images the csv lists are absent and not `allow_missing` (one line:
        how many, the first and its tar; missing_by_tar.txt in `output_dir` lists them).
      ValueError: bad csv, bad arguments, unknown Beam flags, or an output dir holding a
        different conversion.
    """
    if num_shards < 0 or num_validation_shards < 0:
        raise ValueError("num_shards and num_validation_shards must be >= 0 (0 = automatic), "
                         f"got {num_shards} and {num_validation_shards}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    options = beam_options.pipeline_options(
        beam_args, paths={"gldv2_root": root, "output_dir": output_dir, "csv": csv_path,
                          "image_dir": image_dir})
    csv_path = find_gldv2_csv(root, csv_path)
    image_dir = image_dir or train_image_dir(root)
    if not files.isdir(image_dir):
        raise FileNotFoundError(
            f"GLDv2 image folder {image_dir!r} does not exist (csv found at {csv_path}).\n"
            + LAYOUT_HELP.format(root=root))

    images = read_gldv2_csv(csv_path)
    logging.info("%s: %d images of %d landmarks", csv_path, len(images),
                 len({im.landmark_id for im in images}))
    images, excluded = _exclude_landmarks(images, exclude_landmarks)
    present, missing, missing_by_tar = _present_images(
        images, root=root, csv_path=csv_path, image_dir=image_dir, output_dir=output_dir,
        allow_missing=allow_missing)

    label_map = build_label_map(im.landmark_id for im, _ in present)
    labels = np.array([label_map[im.landmark_id] for im, _ in present], np.int64)
    counts = {}
    for im, _ in present:
        counts[im.landmark_id] = counts.get(im.landmark_id, 0) + 1

    train_idx, val_idx = split_per_class(labels, validation_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    train_idx = rng.permutation(train_idx)
    val_idx = rng.permutation(val_idx)
    n_train = _plan_shards(len(train_idx), num_shards)
    n_val = _plan_shards(len(val_idx), num_validation_shards)

    task_dir = files.join(output_dir, REPORT_DIR, TASK_DIR)
    files.makedirs(task_dir)
    label_digest = hashlib.sha1(
        json.dumps(sorted(label_map.items())).encode()).hexdigest()
    plan = {
        "csv": files.absolute(csv_path), "image_dir": files.absolute(image_dir),
        "csv_images": len(images), "present_images": len(present),
        "num_classes": len(label_map), "label_map_sha1": label_digest,
        "validation_fraction": validation_fraction, "seed": seed,
        "train_shards": n_train, "validation_shards": n_val,
    }
    if excluded:
        plan["excluded_landmarks_sha256"] = excluded["sha256"]
    _check_plan(files.join(output_dir, PLAN_NAME), plan)
    # What a killed run left under temporary names (shards, reports, tasks): its shards are
    # redone below, so nothing else writes these names now.
    for folder in (output_dir, files.join(output_dir, REPORT_DIR), task_dir):
        for path in files.remove_temporaries(folder):
            logging.info("Removed %s, left by a run that was killed.", path)
    label_map_path = files.join(output_dir, LABEL_MAP_NAME)
    write_label_map(label_map_path, label_map, counts)
    files.write_json_atomic(files.join(output_dir, REPORT_DIR, PLAN_MISSING_NAME),
                      [[im.image_id, path] for im, path in missing])

    shards, todo = [], []
    for split, indices, n in (("train", train_idx, n_train), ("validation", val_idx, n_val)):
        for k, chunk in enumerate(np.array_split(indices, n) if n else []):
            name = shard_name(split, k, n)
            shards.append((split, name))
            if (files.exists(files.join(output_dir, name))
                    and files.exists(_report_path(output_dir, name))):
                continue
            entries = [(present[i][0].image_id, int(labels[i]), present[i][1]) for i in chunk]
            files.write_json_atomic(files.join(task_dir, name + ".json"),
                              {"split": split, "entries": entries})
            todo.append(name)
    skipped = len(shards) - len(todo)
    if skipped:
        logging.info("resuming: %d finished shards kept, %d to write", skipped, len(todo))

    with beam.Pipeline(runner=beam_options.local_runner(options), options=options) as p:
        _ = (p
             | "Shards" >> beam.Create(todo)
             | "Spread" >> beam.Reshuffle()
             | "WriteShard" >> beam.ParDo(_WriteShard(output_dir, full_decode))
             | "AllWritten" >> beam.combiners.ToList()
             | "Finalize" >> beam.Map(_finalize, output_dir=output_dir, shards=shards,
                                      num_classes=len(label_map),
                                      label_map_path=label_map_path, skipped=skipped,
                                      missing_by_tar=missing_by_tar, excluded=excluded))
    result = p.result
    lengths = {"train": [], "validation": []}
    for split, name in shards:
        with files.open_file(_report_path(output_dir, name)) as f:
            lengths[split].append((name, json.load(f)["written"]))
    tfds_folder.write_metadata(output_dir, lengths)
    summary = read_summary(output_dir)
    summary.counters = beam_options.counters(result, COUNTERS)
    logging.info(
        "GLDv2 conversion done: %d written (train %d, validation %d), %d classes, %d missing, "
        "%d undecodable (listed in %s and %s); %d shards kept from an earlier run; "
        "counters of this run: %s",
        summary.total_written, summary.written["train"], summary.written["validation"],
        summary.num_classes, len(summary.missing), len(summary.undecodable), MISSING_NAME,
        UNDECODABLE_NAME, skipped, summary.counters)
    return summary


def read_summary(output_dir: str) -> ConversionSummary:
    """The `ConversionSummary` of a finished conversion (summary.json and the two lists)."""
    with files.open_file(files.join(output_dir, contract.CONVERTER_SUMMARY_FILE)) as f:
        done = json.load(f)
    with files.open_file(files.join(output_dir, MISSING_NAME)) as f:
        missing = [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
    with files.open_file(files.join(output_dir, UNDECODABLE_NAME)) as f:
        undecodable = [tuple(line.rstrip("\n").split("\t", 2)) for line in f if line.strip()]
    return ConversionSummary(
        written=done["written"], missing=missing, undecodable=undecodable,
        num_classes=done["num_classes"],
        train_pattern=files.join(output_dir, done["train_pattern"]),
        validation_pattern=files.join(output_dir, done["validation_pattern"]),
        label_map_path=files.join(output_dir, done["label_map_path"]),
        shards_skipped=done["shards_skipped"], missing_by_tar=done.get("missing_by_tar", {}),
        excluded=done.get("excluded", {}))
