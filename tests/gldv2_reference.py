"""The in-process GLDv2 converter as it was before the Beam pipeline (frozen reference).

`tests/test_data_gldv2.py` checks that the Beam pipeline of `glam_tf.data.gldv2` writes
byte-identical shards, label map, lists and summary to this code on the same input. It is
the serial path of the pre-Beam `convert_gldv2` (commit 786912e), without the progress bar
and the process pool (which wrote the same bytes). The csv
reader, relabelling, split and example encoding it calls are the library's, unchanged. One
deliberate change since: summary.json names the patterns and the label map relative to its
folder, so that the file does not embed the output path.
"""

import concurrent.futures
import multiprocessing
import os

import numpy as np
import tensorflow as tf

from glam_tf.config import contract
from glam_tf.data import gldv2, records
from glam_tf.files import write_json_atomic


def _write_shard(task):
    out_path = task["path"]
    tmp_path = f"{out_path}.tmp-{os.getpid()}"
    report = {"shard": os.path.basename(out_path), "written": 0, "missing": [],
              "undecodable": []}
    with tf.io.TFRecordWriter(tmp_path) as writer:
        for image_id, label, path in task["entries"]:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                report["missing"].append([image_id, path])
                continue
            try:
                info = records.probe_image(data, full_decode=task["full_decode"])
            except records.UndecodableImageError as e:
                report["undecodable"].append([image_id, path, str(e)])
                continue
            example = records.make_example(encoded=data, image_id=image_id, label=label,
                                           info=info)
            writer.write(example.SerializeToString(deterministic=True))
            report["written"] += 1
    write_json_atomic(task["report_path"], report)
    os.replace(tmp_path, out_path)
    return report


def _plan_shards(num_images, num_shards):
    if num_images == 0:
        return 0
    if num_shards > 0:
        return min(num_shards, num_images)
    return max(1, -(-num_images // gldv2.IMAGES_PER_SHARD))


def _init_worker():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def convert_reference(root, output_dir, *, num_shards=0, num_validation_shards=0,
                      validation_fraction=0.0, seed=0, full_decode=True, num_workers=1):
    """The old `convert_gldv2(root, output_dir, ...)` on a fresh output dir; `num_workers`
    > 1 writes shards in its spawned process pool (bench/convert.py's baseline)."""
    csv_path = gldv2.find_gldv2_csv(root)
    image_dir = gldv2.train_image_dir(root)
    images = gldv2.read_gldv2_csv(csv_path)
    present, missing = [], []
    for im in images:
        path = gldv2.gldv2_image_path(image_dir, im.image_id)
        (present if os.path.isfile(path) else missing).append((im, path))
    label_map = gldv2.build_label_map(im.landmark_id for im, _ in present)
    labels = np.array([label_map[im.landmark_id] for im, _ in present], np.int64)
    counts = {}
    for im, _ in present:
        counts[im.landmark_id] = counts.get(im.landmark_id, 0) + 1
    train_idx, val_idx = gldv2.split_per_class(labels, validation_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    train_idx = rng.permutation(train_idx)
    val_idx = rng.permutation(val_idx)
    n_train = _plan_shards(len(train_idx), num_shards)
    n_val = _plan_shards(len(val_idx), num_validation_shards)
    os.makedirs(os.path.join(output_dir, gldv2.REPORT_DIR), exist_ok=True)
    label_map_path = os.path.join(output_dir, gldv2.LABEL_MAP_NAME)
    gldv2.write_label_map(label_map_path, label_map, counts)
    tasks = []
    for split, indices, n in (("train", train_idx, n_train), ("validation", val_idx, n_val)):
        for k, chunk in enumerate(np.array_split(indices, n) if n else []):
            name = gldv2.shard_name(split, k, n)
            entries = [(present[i][0].image_id, int(labels[i]), present[i][1]) for i in chunk]
            tasks.append((split, {
                "path": os.path.join(output_dir, name),
                "report_path": os.path.join(output_dir, gldv2.REPORT_DIR, name + ".json"),
                "entries": entries, "full_decode": full_decode}))
    if num_workers == 1 or len(tasks) == 1:
        reports = [(split, _write_shard(task)) for split, task in tasks]
    else:
        ctx = multiprocessing.get_context("spawn")  # TF in the parent makes fork unsafe.
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=min(num_workers, len(tasks)), mp_context=ctx,
                initializer=_init_worker) as pool:
            futures = [(split, pool.submit(_write_shard, task)) for split, task in tasks]
            reports = [(split, f.result()) for split, f in futures]
    written = {"train": 0, "validation": 0}
    worker_missing, undecodable = [], []
    for split, report in reports:
        written[split] += report["written"]
        worker_missing.extend(tuple(m) for m in report["missing"])
        undecodable.extend(tuple(u) for u in report["undecodable"])
    all_missing = sorted([(im.image_id, path) for im, path in missing] + worker_missing)
    undecodable.sort()
    with open(os.path.join(output_dir, gldv2.MISSING_NAME), "w", encoding="utf-8") as f:
        f.writelines(f"{image_id}\t{path}\n" for image_id, path in all_missing)
    with open(os.path.join(output_dir, gldv2.UNDECODABLE_NAME), "w", encoding="utf-8") as f:
        f.writelines(f"{image_id}\t{path}\t{reason}\n" for image_id, path, reason in undecodable)
    summary = {
        "written": written, "total_written": sum(written.values()),
        "missing": len(all_missing), "undecodable": len(undecodable),
        "num_classes": len(label_map),
        "train_pattern": "train-*-of-*.tfrecord",
        "validation_pattern": "validation-*-of-*.tfrecord",
        "label_map_path": gldv2.LABEL_MAP_NAME, "shards_skipped": 0}
    write_json_atomic(os.path.join(output_dir, contract.CONVERTER_SUMMARY_FILE), summary)
    return summary


def output_files(output_dir):
    """{name: bytes} of every file the converter writes (not the plan: it has abs paths),
    with `output_dir` spelled `<out>` so two output folders compare."""
    out = {}
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) and name != gldv2.PLAN_NAME:
            with open(path, "rb") as f:
                out[name] = f.read().replace(output_dir.encode(), b"<out>")
    return out
