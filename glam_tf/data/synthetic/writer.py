"""Writes the synthetic set: training photos in the GLDv2 layout, the test split in the
revisited layout, a manifest and the completion marker.

The layouts are gldv2.py's and testsets.py's own helpers, so the converter and the test-set
loader read exactly what is written here.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import time

import numpy as np
from absl import logging

from glam_tf import files
from glam_tf.config.data import SyntheticConfig
from glam_tf.config.settings import is_int
from glam_tf.data import gldv2, testsets
from glam_tf.data import progress as progress_lib
from glam_tf.data.synthetic.photo import Neighbour, render_photo
from glam_tf.data.synthetic.scene import draw_palette, render_scene, seeded_rng

MARKER_NAME = ".synthetic_complete.json"
MANIFEST_NAME = "synthetic_manifest.json"
DATASET_NAME = "synth"
VAL_DATASET_NAME = "synth_val"
# Clutter buildings are scenes of ids from here on: never a landmark's.
_CLUTTER_BASE = 1_000_000


def image_id(seed: int, landmark: int, k: int) -> str:
    """The 16-hex GLDv2-style id of training photo k of a landmark."""
    return hashlib.sha1(f"glam-synth/{seed}/{landmark}/{k}".encode()).hexdigest()[:16]


def _building(seed: int, building: int, canvas: int):
    """(scene, base palette) of landmark or clutter building number `building`."""
    return (render_scene(seed, building, canvas),
            draw_palette(seeded_rng(seed, 4, building)))


# Clutter buildings recur in every task: kept, a pool of the default size whole (a scene
# is 13 bytes per canvas pixel: 31 MB at 1024-px photos).
_clutter_building = functools.lru_cache(maxsize=16)(_building)


def _neighbours(task: dict, k: int) -> list:
    """The clutter buildings beside photo k of the task's landmark (seeded per photo)."""
    rng = seeded_rng(task["seed"], 5, task["landmark"], k)
    out = []
    for side in (-1, 1):
        for _ in range(task["neighbours"]):
            scene, palette = _clutter_building(
                task["seed"], _CLUTTER_BASE + int(rng.integers(task["clutter_pool"])),
                task["canvas"])
            out.append(Neighbour(scene=scene, base_palette=palette, side=side,
                                 scale=float(rng.uniform(0.75, 1.2)),
                                 gap=float(rng.uniform(0.0, 0.08))))
    return out


def _render_landmark_task(task: dict) -> list:
    """Renders and writes the photos of one landmark; returns one record per photo."""
    scene, base_palette = _building(task["seed"], task["landmark"], task["canvas"])
    out = []
    for k, (path, level) in enumerate(task["photos"]):
        rng = seeded_rng(task["seed"], 2, task["landmark"], k)
        photo = render_photo(scene, rng, level, task["long_side"], base_palette=base_palette,
                             palette_variation=task["palette_variation"],
                             frame_scale=task["frame_scale"],
                             neighbours=_neighbours(task, k),
                             occlusion_scale=task["occlusion_scale"],
                             illumination=task["illumination"],
                             position_jitter=task["position_jitter"],
                             zoom_jitter=task["zoom_jitter"])
        files.makedirs(files.dirname(path))
        files.atomic_write(path, lambda f, jpeg=photo.jpeg: f.write(jpeg))
        out.append({"path": path, "level": level, "bbox": photo.bbox,
                    "occluded": round(photo.occluded, 4), "size": [photo.width, photo.height]})
    return out


def _split_tasks(config: SyntheticConfig, split: str, first: int, count: int,
                 tasks: list) -> set:
    """Appends the tasks of a revisited split (`count` query landmarks from number `first`,
    then its distractor landmarks) to `tasks`; returns the split's landmark numbers.

    Database names (db_<k>) follow a seeded shuffle, so position says nothing about
    landmark; query names are query_<j>_<q> with j counted within the split.
    """
    root = config.root
    db_entries = []   # (landmark index, level, temporary key)
    new = []
    for j in range(count):
        lm = first + j
        photos = [(testsets.revisited_image_path(root, split, f"query_{j:03d}_{q}"), "query")
                  for q in range(config.queries_per_landmark)]
        n = 0
        for level, n_level in zip(("easy", "hard", "junk"), config.database_per_landmark):
            for _ in range(n_level):
                db_entries.append((lm, level, f"{lm}-{n}"))
                photos.append((f"db:{lm}-{n}", level))
                n += 1
        new.append({"landmark": lm, "photos": photos, "kind": "test", "split": split})
    for j in range(config.num_distractor_landmarks):
        lm = first + count + j
        photos = []
        for n in range(config.images_per_distractor):
            db_entries.append((lm, "distractor", f"{lm}-{n}"))
            photos.append((f"db:{lm}-{n}", "distractor"))
        new.append({"landmark": lm, "photos": photos, "kind": "distractor", "split": split})
    shuffle_keys = (3,) if split == DATASET_NAME else (3, 1)
    order = seeded_rng(config.seed, *shuffle_keys).permutation(len(db_entries))
    db_name = {db_entries[idx][2]: f"db_{pos:05d}" for pos, idx in enumerate(order)}
    for task in new:
        task["photos"] = [
            (testsets.revisited_image_path(root, split, db_name[p[3:]])
             if p.startswith("db:") else p, lv)
            for p, lv in task["photos"]]
    tasks.extend(new)
    return {t["landmark"] for t in new}


def _ground_truth(split_tasks: list, results: dict, manifest: dict):
    """(imlist, qimlist, gnd) of a split in the revisited format; records every image's
    landmark, level and occlusion in `manifest` (keyed by image name)."""
    name = lambda rec: files.splitext(files.basename(rec["path"]))[0]  # noqa: E731
    imlist = sorted(name(rec) for t in split_tasks for rec in results[t["landmark"]]
                    if rec["level"] != "query")
    name_index = {n: i for i, n in enumerate(imlist)}
    qimlist, gnd = [], []
    for task in split_tasks:
        lm = task["landmark"]
        for rec in results[lm]:
            manifest[name(rec)] = {"landmark": lm, "level": rec["level"],
                                   "occluded": rec["occluded"]}
        if task["kind"] != "test":
            continue
        levels = {"easy": [], "hard": [], "junk": []}
        for rec in results[lm]:
            if rec["level"] in levels:
                levels[rec["level"]].append(name_index[name(rec)])
        for rec in results[lm]:
            if rec["level"] == "query":
                qimlist.append(name(rec))
                gnd.append({"bbx": [float(c) for c in rec["bbox"]],
                            **{k: np.array(sorted(v), dtype=np.int64)
                               for k, v in levels.items()}})
    return imlist, qimlist, gnd


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
    val_gnd_path: str = ""
    val_queries: int = 0


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
    num_distractor_landmarks = config.num_distractor_landmarks
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
    # Test landmarks follow the training ones, its distractors follow those, then the
    # validation landmarks and theirs: disjoint by index (and the test split's bytes do not
    # depend on whether a validation split is asked for).
    splits = [(DATASET_NAME, num_train_landmarks, num_test_landmarks)]
    if config.num_val_landmarks:
        splits.append((VAL_DATASET_NAME, num_train_landmarks + num_test_landmarks
                       + num_distractor_landmarks, config.num_val_landmarks))
    split_landmarks = {split: _split_tasks(config, split, first, count, tasks)
                       for split, first, count in splits}

    for task in tasks:
        task.update(seed=seed, canvas=canvas, long_side=image_size,
                    palette_variation=palette_variation,
                    frame_scale=float(config.frame_scale), neighbours=config.neighbours,
                    clutter_pool=config.clutter_pool,
                    occlusion_scale=float(config.occlusion_scale),
                    illumination=float(config.illumination),
                    position_jitter=float(config.position_jitter),
                    zoom_jitter=float(config.zoom_jitter))

    marker = files.join(root, MARKER_NAME)
    if files.exists(marker):
        files.remove(marker)
    files.makedirs(jpg_dir)
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
    train_csv = files.join(root, gldv2.CSV_CLEAN)
    gldv2.write_clean_csv(train_csv, train_rows)

    # Ground truth (revisited format), one file per split.
    manifest_splits, gnd_paths, num_queries, num_database = {}, {}, {}, {}
    for split, landmarks in split_landmarks.items():
        imlist, qimlist, gnd = _ground_truth(
            [t for t in tasks if t["landmark"] in landmarks], results,
            manifest_splits.setdefault("test" if split == DATASET_NAME else "val", {}))
        gnd_paths[split] = testsets.revisited_gnd_path(root, split)
        testsets.write_revisited_gnd(gnd_paths[split], imlist, qimlist, gnd)
        num_queries[split], num_database[split] = len(qimlist), len(imlist)

    manifest = {
        "params": params,
        "train": {str(int(landmark_ids[i])): i for i in range(num_train_landmarks)},
        **manifest_splits,
    }
    files.write_json_atomic(files.join(root, MANIFEST_NAME), manifest)
    seconds = time.monotonic() - start
    summary = SyntheticSummary(
        root=root, train_csv=train_csv,
        train_images=num_train_landmarks * images_per_landmark,
        train_landmarks=num_train_landmarks, test_dir=test_dir,
        gnd_path=gnd_paths[DATASET_NAME], num_queries=num_queries[DATASET_NAME],
        num_database=num_database[DATASET_NAME], seconds=seconds,
        val_gnd_path=gnd_paths.get(VAL_DATASET_NAME, ""),
        val_queries=num_queries.get(VAL_DATASET_NAME, 0))
    files.write_json_atomic(marker, {"params": params, "summary": dataclasses.asdict(summary)})
    logging.info("synthetic landmarks in %s: %d training photos of %d landmarks, %d test "
                 "queries, %d test database photos, %d validation queries (%.1f s)", root,
                 summary.train_images, num_train_landmarks, summary.num_queries,
                 summary.num_database, summary.val_queries, seconds)
    return summary


def generate_if_absent(config: SyntheticConfig, *, num_workers: int = 1,
                       show_progress: bool = True) -> SyntheticSummary:
    """Generates the synthetic set unless `config.root` holds a complete one of this config.

    Idempotent: the marker file is written last, so an interrupted generation is redone. A
    complete set generated with other settings raises instead of being overwritten.
    """
    config.validate()   # before the marker: a bad value fails first
    root = config.root
    marker = files.join(root, MARKER_NAME)
    params = config.generator_params()
    if files.exists(marker):
        with files.open_file(marker) as f:
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
