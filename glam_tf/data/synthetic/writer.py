"""Writes the synthetic set: training photos in the GLDv2 layout, the test split in the
revisited layout, a manifest and the completion marker.

The layouts are gldv2.py's and testsets.py's own helpers, so the converter and the test-set
loader read exactly what is written here.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time

import numpy as np
from absl import logging

from glam_tf.config.data import SyntheticConfig
from glam_tf.config.settings import is_int
from glam_tf.data import gldv2, testsets
from glam_tf.data import progress as progress_lib
from glam_tf.data.synthetic.photo import render_photo
from glam_tf.data.synthetic.scene import draw_palette, render_scene, seeded_rng
from glam_tf.files import atomic_write, write_json_atomic

MARKER_NAME = ".synthetic_complete.json"
MANIFEST_NAME = "synthetic_manifest.json"
DATASET_NAME = "synth"


def image_id(seed: int, landmark: int, k: int) -> str:
    """The 16-hex GLDv2-style id of training photo k of a landmark."""
    return hashlib.sha1(f"glam-synth/{seed}/{landmark}/{k}".encode()).hexdigest()[:16]


def _render_landmark_task(task: dict) -> list:
    """Renders and writes the photos of one landmark; returns one record per photo."""
    scene = render_scene(task["seed"], task["landmark"], task["canvas"])
    base_palette = draw_palette(seeded_rng(task["seed"], 4, task["landmark"]))
    out = []
    for k, (path, level) in enumerate(task["photos"]):
        rng = seeded_rng(task["seed"], 2, task["landmark"], k)
        photo = render_photo(scene, rng, level, task["long_side"], base_palette=base_palette,
                             palette_variation=task["palette_variation"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f, jpeg=photo.jpeg: f.write(jpeg))
        out.append({"path": path, "level": level, "bbox": photo.bbox,
                    "occluded": round(photo.occluded, 4), "size": [photo.width, photo.height]})
    return out


@dataclasses.dataclass(frozen=True)
class SyntheticSummary:
    """Where `generate_synthetic_landmarks` put things and how many."""

    root: str
    train_csv: str
    train_images: int
    train_landmarks: int
    test_dir: str
    gnd_path: str
    num_queries: int
    num_database: int
    seconds: float


def generate_synthetic_landmarks(config: SyntheticConfig, *, num_workers: int = 1,
                                 show_progress: bool = True) -> SyntheticSummary:
    """Writes the synthetic training set (GLDv2 layout) and test set (revisited layout).

    Args:
      config: the set (SyntheticConfig: root, sizes, palette variation, seed); the same
        config gives the same bytes.
      num_workers: processes (spawned); 1 renders here.
      show_progress: progress bar.

    Returns:
      A `SyntheticSummary`.

    Raises:
      SettingError: a setting out of range (named).
    """
    config.validate()
    if not is_int(num_workers) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    params = config.generator_params()
    root, seed, image_size = config.root, config.seed, config.image_size
    num_train_landmarks = config.num_train_landmarks
    images_per_landmark = config.images_per_landmark
    num_test_landmarks = config.num_test_landmarks
    queries_per_landmark = config.queries_per_landmark
    database_per_landmark = config.database_per_landmark
    num_distractor_landmarks = config.num_distractor_landmarks
    images_per_distractor = config.images_per_distractor
    palette_variation = float(config.palette_variation)
    start = time.monotonic()
    canvas = int(round(1.5 * image_size))
    rng = seeded_rng(seed, 0)
    # Sparse, distinct GLDv2-like landmark ids for the training classes.
    landmark_ids = np.sort(rng.choice(200000, size=num_train_landmarks, replace=False))
    train_dir = gldv2.train_image_dir(root)
    test_dir = testsets.revisited_dir(root, DATASET_NAME)
    jpg_dir = testsets.revisited_image_dir(root, DATASET_NAME)

    tasks = []
    train_rows = []
    for i in range(num_train_landmarks):
        ids = [image_id(seed, i, k) for k in range(images_per_landmark)]
        train_rows.append((int(landmark_ids[i]), ids))
        photos = [(gldv2.gldv2_image_path(train_dir, t), "train") for t in ids]
        tasks.append({"landmark": i, "photos": photos, "kind": "train"})
    # Test landmarks follow the training ones; distractors follow those: disjoint by index.
    db_entries = []   # (landmark index, level, temporary key)
    for j in range(num_test_landmarks):
        lm = num_train_landmarks + j
        photos = [(testsets.revisited_image_path(root, DATASET_NAME, f"query_{j:03d}_{q}"),
                   "query") for q in range(queries_per_landmark)]
        n = 0
        for level, count in zip(("easy", "hard", "junk"), database_per_landmark):
            for _ in range(count):
                db_entries.append((lm, level, f"{lm}-{n}"))
                photos.append((f"db:{lm}-{n}", level))
                n += 1
        tasks.append({"landmark": lm, "photos": photos, "kind": "test"})
    for j in range(num_distractor_landmarks):
        lm = num_train_landmarks + num_test_landmarks + j
        photos = []
        for n in range(images_per_distractor):
            db_entries.append((lm, "distractor", f"{lm}-{n}"))
            photos.append((f"db:{lm}-{n}", "distractor"))
        tasks.append({"landmark": lm, "photos": photos, "kind": "distractor"})
    # Database names in a seeded shuffled order, so position says nothing about landmark.
    order = seeded_rng(seed, 3).permutation(len(db_entries))
    db_name = {}
    imlist = []
    for pos, idx in enumerate(order):
        name = f"db_{pos:05d}"
        db_name[db_entries[idx][2]] = name
        imlist.append(name)
    for task in tasks:
        task["photos"] = [
            (testsets.revisited_image_path(root, DATASET_NAME, db_name[p[3:]])
             if p.startswith("db:") else p, lv)
            for p, lv in task["photos"]]
        task.update(seed=seed, canvas=canvas, long_side=image_size,
                    palette_variation=float(palette_variation))

    marker = os.path.join(root, MARKER_NAME)
    if os.path.exists(marker):
        os.remove(marker)
    os.makedirs(jpg_dir, exist_ok=True)
    total = sum(len(t["photos"]) for t in tasks)
    bar = progress_lib.ProgressBar(total, unit="images", description="synthetic landmarks",
                                   enabled=show_progress)
    results = {}
    done = 0
    if num_workers == 1:
        for t in tasks:
            results[t["landmark"]] = _render_landmark_task(t)
            done += len(t["photos"])
            bar.update(done)
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_render_landmark_task, t): t for t in tasks}
            for f in concurrent.futures.as_completed(futures):
                results[futures[f]["landmark"]] = f.result()
                done += len(futures[f]["photos"])
                bar.update(done)
    bar.close()

    # Training csv (GLDv2 train_clean.csv format).
    train_csv = os.path.join(root, gldv2.CSV_CLEAN)
    gldv2.write_clean_csv(train_csv, train_rows)

    # Ground truth (revisited format).
    name_index = {n: i for i, n in enumerate(imlist)}
    qimlist, gnd = [], []
    manifest_test = {}
    for task in tasks:
        lm = task["landmark"]
        for rec in results[lm]:
            name = os.path.splitext(os.path.basename(rec["path"]))[0]
            if task["kind"] != "train":
                manifest_test[name] = {"landmark": lm, "level": rec["level"],
                                       "occluded": rec["occluded"]}
        if task["kind"] != "test":
            continue
        levels = {"easy": [], "hard": [], "junk": []}
        for rec in results[lm]:
            if rec["level"] in levels:
                levels[rec["level"]].append(
                    name_index[os.path.splitext(os.path.basename(rec["path"]))[0]])
        for rec in results[lm]:
            if rec["level"] == "query":
                qimlist.append(os.path.splitext(os.path.basename(rec["path"]))[0])
                gnd.append({"bbx": [float(c) for c in rec["bbox"]],
                            **{k: np.array(sorted(v), dtype=np.int64)
                               for k, v in levels.items()}})
    gnd_path = testsets.revisited_gnd_path(root, DATASET_NAME)
    testsets.write_revisited_gnd(gnd_path, imlist, qimlist, gnd)

    manifest = {
        "params": params,
        "train": {str(int(landmark_ids[i])): i for i in range(num_train_landmarks)},
        "test": manifest_test,
    }
    write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest)
    seconds = time.monotonic() - start
    summary = SyntheticSummary(
        root=root, train_csv=train_csv,
        train_images=num_train_landmarks * images_per_landmark,
        train_landmarks=num_train_landmarks, test_dir=test_dir, gnd_path=gnd_path,
        num_queries=len(qimlist), num_database=len(imlist), seconds=seconds)
    write_json_atomic(marker, {"params": params, "summary": dataclasses.asdict(summary)})
    logging.info("synthetic landmarks in %s: %d training photos of %d landmarks, %d queries, "
                 "%d database photos (%.1f s)", root, summary.train_images,
                 num_train_landmarks, len(qimlist), len(imlist), seconds)
    return summary


def generate_if_absent(config: SyntheticConfig, *, num_workers: int = 1,
                       show_progress: bool = True) -> SyntheticSummary:
    """Generates the synthetic set unless `config.root` holds a complete one of this config.

    Idempotent: the marker file is written last, so an interrupted generation is redone. A
    complete set generated with other settings raises instead of being overwritten.
    """
    config.validate()   # before the marker: a bad value fails first
    root = config.root
    marker = os.path.join(root, MARKER_NAME)
    params = config.generator_params()
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            saved = json.load(f)
        # A set written before a setting existed was generated with its default.
        saved["params"] = {**SyntheticConfig().generator_params(), **saved["params"]}
        if saved["params"] == params:
            logging.info("synthetic landmarks already in %s", root)
            return SyntheticSummary(**saved["summary"])
        diff = sorted(k for k in params if params[k] != saved["params"].get(k))
        raise ValueError(
            f"{root} holds synthetic landmarks generated with other arguments ("
            + ", ".join(f"{k}: {saved['params'].get(k)!r} there, {params[k]!r} asked" for k in diff)
            + "); use another folder or delete it")
    return generate_synthetic_landmarks(config, num_workers=num_workers,
                                        show_progress=show_progress)
