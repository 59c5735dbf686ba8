"""The evaluator end to end: a tiny GLAM model restored from a training checkpoint on a
tiny revisited-format set (+ distractors, undecodable files), the real Oxford query crops
as a small real retrieval set, and SavedModel loading (batched and DELG signatures)."""

import csv
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf.eval import evaluator, extract, models, report
from glam_tf.export import export_saved_model, build_serving_module
from glam_tf.model import ModelConfig, build_descriptor_model
from helpers import MAX_SIZE, SCALES, fake_backend, ref_compute_map, write_tiny_revisited
from keras_helpers import tiny_keras_model


def unit_rows(x):
    """Independent reference: each row divided by its L2 norm."""
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """A training directory as training writes it, with an untrained ResNet50 GLAM."""
    d = tmp_path_factory.mktemp("train")
    config = ModelConfig(backbone="resnet50", weights="none", embedding_dim=32)
    model = build_descriptor_model(config)
    (d / "model_config.json").write_text(json.dumps(config.to_dict()))
    tf.train.Checkpoint(model=model).save(str(d / "checkpoints" / "ckpt"))
    return d


@pytest.fixture(scope="module")
def glam_backend(train_dir):
    return models.build_backend(train_dir=str(train_dir), scales=SCALES,
                                max_image_size=MAX_SIZE)


def _describe_one_by_one(backend, items):
    """Reference descriptors: each image alone (no batching, no shards)."""
    out = []
    for it in items:
        try:
            w, h = extract.read_size(it.path)
            size, _ = extract.target_size(w, h, it.box, MAX_SIZE, backend.min_side())
            out.append(backend(extract.load_image(it, size)[None])[0])
        except extract.UndecodableImage:
            out.append(None)
    return out


def test_evaluator_end_to_end_tiny_revisited(tmp_path, glam_backend, train_dir, capsys,
                                             caplog):
    imlist, qimlist, gnd = write_tiny_revisited(tmp_path / "data")
    out = tmp_path / "out"
    kwargs = dict(dataset="roxford5k", data_root=str(tmp_path / "data"), output_dir=str(out),
                  distractors=True, max_image_size=MAX_SIZE, scales=SCALES, batch_size=4,
                  shard_size=4, visualize=("0", "q1"), topk=20)
    res = evaluator.run_evaluation(backend=glam_backend, **kwargs)
    assert glam_backend.info["kind"] == "checkpoint"
    assert glam_backend.info["path"].startswith(str(train_dir / "checkpoints"))
    assert res["status"] == "complete" and res["protocol"] == "revisited"
    c = res["counts"]
    assert (c["queries"], c["database"], c["distractors"]) == (3, 11, 3)
    assert c["undecodable_database"] == 2 and c["undecodable_queries"] == 1
    assert c["queries_evaluated"] == 2
    assert sorted(u["id"] for u in res["undecodable"]) == ["0/00/x1.jpg", "db7", "q2"]
    assert {(u["split"], u["index"]) for u in res["undecodable"]} == {
        ("database", 7), ("distractors", 9), ("queries", 2)}
    # the undecodable query: a warning, no AP, left out of the means
    assert "query 2 (q2) is undecodable" in caplog.text
    assert res["per_query"][2]["valid"] is False
    assert res["per_query"][2]["ap"] == {"easy": None, "medium": None, "hard": None}
    assert all(res["metrics"][s]["num_evaluated"] == 2 for s in ("easy", "medium", "hard"))
    printed = capsys.readouterr().out
    assert "ROxf+1M" in printed and "M mAP" in printed and "H mP@10" in printed
    assert f"{res['metrics']['medium']['mAP']:6.2f}" in printed

    # batching changes nothing but rounding: the stored descriptors equal one image at a
    # time; then an independent reference from them: full stable argsort, invalid last,
    # cirtorch compute_map
    ts_items = ([extract.ImageItem(q, str(tmp_path / "data/roxford5k/jpg" / f"{q}.jpg"),
                                   tuple(g["bbx"])) for q, g in zip(qimlist, gnd)])
    db_items = ([extract.ImageItem(n, str(tmp_path / "data/roxford5k/jpg" / f"{n}.jpg"))
                 for n in imlist]
                + [extract.ImageItem(n, str(tmp_path / "data/revisitop1m/jpg" / n))
                   for n in ("0/00/x0.jpg", "0/00/x1.jpg", "0/00/x2.jpg")])
    q_rows = _describe_one_by_one(glam_backend, ts_items)
    assert q_rows[2] is None
    q_alone = np.stack(q_rows[:2])
    db_rows = _describe_one_by_one(glam_backend, db_items)
    valid = np.array([r is not None for r in db_rows])
    db_alone = np.stack([r if r is not None else np.zeros(32, np.float32) for r in db_rows])
    feats = out / "features"
    q = extract.merge_shards(str(feats / "roxford5k-queries"), qimlist).descriptors[:2]
    db = np.concatenate([
        extract.merge_shards(str(feats / "roxford5k-database"), imlist).descriptors,
        extract.merge_shards(str(feats / "revisitop1m"),
                             ["0/00/x0.jpg", "0/00/x1.jpg", "0/00/x2.jpg"]).descriptors])
    np.testing.assert_allclose(q, q_alone, atol=2e-5)
    np.testing.assert_allclose(db, db_alone, atol=2e-5)
    scores = np.where(valid[None], q @ db.T, -np.inf)
    ranking = np.argsort(-scores, axis=1, kind="stable").T
    for setup, pos, ign in (("easy", ["easy"], ["junk", "hard"]),
                            ("medium", ["easy", "hard"], ["junk"]),
                            ("hard", ["hard"], ["junk", "easy"])):
        g = [{"ok": np.concatenate([x[k] for k in pos]),
              "junk": np.concatenate([x[k] for k in ign])} for x in gnd[:2]]
        ref_map, ref_pr, ref_aps = ref_compute_map(ranking, g)
        assert res["metrics"][setup]["mAP"] == pytest.approx(100 * ref_map, abs=0.006)
        assert res["metrics"][setup]["mP@10"] == pytest.approx(100 * ref_pr[2], abs=0.006)
        for i in range(2):
            assert res["per_query"][i]["ap"][setup] == pytest.approx(ref_aps[i], abs=1e-4)
    # undecodable database images rank last, by index
    assert [t[0] for t in res["per_query"][0]["top"][-2:]] == ["db7", "0/00/x1.jpg"]
    assert res["per_query"][0]["top"][-1][1] == float("-inf")

    # JSON on disk = returned dict; settings recorded
    saved = json.loads((out / "results-roxford5k+1m.json").read_text())
    assert saved["metrics"] == res["metrics"] and saved["settings"]["scales"] == list(SCALES)
    assert saved["settings"]["max_image_size"] == MAX_SIZE
    assert "rank last" in saved["settings"]["undecodable_policy"]
    png = Image.open(res["outputs"]["png"])
    cell_w, cell_h = report.cell_size()   # 140 x 158: a framed 128-px image and its label
    assert png.size == (11 * cell_w, report.TITLE_H + 2 * cell_h + report.LEGEND_H)
    assert (cell_w, cell_h) == (140, 158)
    page = open(res["outputs"]["html"]).read()
    assert page.count("<tr>") == 2 and "q00" in page and "positive" in page
    # the picture's colours follow the Medium ground truth
    top0 = [t[0] for t in res["per_query"][0]["top"][:10]]
    expect = [report.result_status(gnd[0], (imlist + ["0/00/x0.jpg", "0/00/x1.jpg",
                                                     "0/00/x2.jpg"]).index(n), valid)
              for n in top0]
    for k, status in enumerate(expect):
        assert f"{k + 1}. {top0[k]}<br>{status}" in page

    # a second run reuses every shard and gives the same numbers
    again = evaluator.run_evaluation(backend=glam_backend, print_table=False, **kwargs)
    assert all(e["images_done_this_run"] == 0 for e in again["extraction"].values())
    assert again["metrics"] == res["metrics"]


def test_oxford_query_crops_as_real_retrieval_set(tmp_path, shared_data, glam_backend):
    """11 landmarks x 5 real photos: photo 1 of each landmark queries the other 44."""
    has_faiss = importlib.util.find_spec("faiss") is not None  # the optional extra
    folder = shared_data / "oxford_query_crops"
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    root = tmp_path / "data" / "synth"  # the revisited layout of the synthetic split
    (root / "jpg").mkdir(parents=True)
    for r in rows:
        os.symlink(folder / r["filename"], root / "jpg" / r["filename"])
    db = [r for r in rows if r["query_id"] != "1"]
    queries = [r for r in rows if r["query_id"] == "1"]
    gnd = [{"bbx": [0.0, 0.0, float(q["width"]), float(q["height"])],
            "easy": np.array([i for i, r in enumerate(db) if r["landmark"] == q["landmark"]]),
            "hard": np.zeros(0, int), "junk": np.zeros(0, int)} for q in queries]
    with open(root / "gnd_synth.pkl", "wb") as f:
        pickle.dump({"imlist": [r["filename"][:-4] for r in db],
                     "qimlist": [q["filename"][:-4] for q in queries], "gnd": gnd}, f)
    res = evaluator.run_evaluation(
        backend=glam_backend, print_table=False, dataset="synth",
        data_root=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
        max_image_size=MAX_SIZE, scales=SCALES, batch_size=8,
        approx_index="Flat" if has_faiss else "", approx_k=10)
    assert res["counts"]["queries"] == 11 and res["counts"]["database"] == 44
    if has_faiss:
        assert res["approx_index"]["recall_at_k"] == 1.0  # a flat faiss index is exact
    assert res["metrics"]["medium"]["num_evaluated"] == 11
    assert res["metrics"]["hard"]["num_evaluated"] == 0  # no hard positives at all
    # exactly 4 positives per query: AP from the stored top-44 ranking by hand
    for i, pq in enumerate(res["per_query"]):
        ranks = [k for k, (name, _) in enumerate(pq["top"][:44])
                 if name.rsplit("_", 1)[0] == queries[i]["landmark"]]
        assert len(ranks) == 4
        ap = sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(ranks)) / 4
        assert pq["ap"]["medium"] == pytest.approx(ap, abs=1e-6)


def test_saved_model_batched_and_delg_signatures(tmp_path):
    model = tiny_keras_model()
    base = tmp_path / "models" / "glam"
    export_saved_model(model, str(base), version=3, scales=SCALES, max_image_size=MAX_SIZE)
    export_saved_model(model, str(base), version=12, scales=SCALES, max_image_size=MAX_SIZE)
    assert models.resolve_saved_model_dir(str(base)) == str(base / "12")
    assert models.resolve_saved_model_dir(str(base / "3")) == str(base / "3")
    batched = models.load_saved_model(str(base))
    assert batched.info["signature"] == "batched_global_descriptors"
    assert batched.scales == SCALES and batched.info["scales_source"] == "export"

    # a DELG-style SavedModel with only serving_default: client rule, client scales
    module = build_serving_module(model, scales=SCALES, max_image_size=MAX_SIZE)
    delg_dir = tmp_path / "delg" / "1"
    tf.saved_model.save(module, str(delg_dir),
                        signatures={"serving_default": module.serving_default})
    delg = models.load_saved_model(str(tmp_path / "delg"), scales=SCALES)
    assert delg.info["signature"] == "serving_default" and delg.scales == SCALES

    rng = np.random.default_rng(0)
    images = (rng.random((3, 50, 60, 3)) * 255).astype(np.uint8)
    a, b = batched(images), delg(images)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # by hand: per scale resize + model, unit rows averaged, L2
    per_scale = [model(tf.image.resize(images.astype(np.float32),
                                       [round(50 * s), round(60 * s)])).numpy() for s in SCALES]
    np.testing.assert_allclose(a, unit_rows(np.mean(per_scale, axis=0)), atol=1e-5)
    rows = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(models.delg_client_descriptor(rows),
                               np.array([0.6, 1.8]) / np.linalg.norm([0.6, 1.8]))

    # Other scales than the export's are honoured (serving_default, one image per call),
    # not silently replaced by the export-time ones; equal ones keep the batched signature.
    single = models.load_saved_model(str(base), scales=(1.0,))
    assert single.info["signature"] == "serving_default" and single.scales == (1.0,)
    assert single.info["export"] == {"scales": list(SCALES), "max_image_size": MAX_SIZE}
    np.testing.assert_allclose(single(images), unit_rows(
        model(images.astype(np.float32)).numpy()), atol=1e-5)
    assert models.load_saved_model(str(base), scales=(2**-0.5, 1.0)).info["signature"] == \
        "batched_global_descriptors"
    batched_only = tmp_path / "batched_only" / "1"
    tf.saved_model.save(module, str(batched_only), signatures={
        "batched_global_descriptors": module.batched_global_descriptors})
    with pytest.raises(ValueError, match=r"has no serving_default signature to apply "
                                         r"scales=\[1.0\]"):
        models.load_saved_model(str(batched_only), scales=(1.0,))

    with pytest.raises(FileNotFoundError, match="not a SavedModel"):
        models.resolve_saved_model_dir(str(tmp_path))
    assert "does not exist" in models.check_model_source(str(tmp_path / "nope"), "")
    assert "exactly one" in models.check_model_source(str(base), str(tmp_path))
    assert "lacks" in models.check_model_source("", str(tmp_path))


def test_original_protocol_end_to_end(tmp_path, capsys):
    """Oxford5k-format ground truth (queries are database images, good + ok positives, junk
    ignored, `oxc1_` prefixes) scored with a NumPy back-end: mAP only, as the reference."""
    rng = np.random.default_rng(3)
    jpg = tmp_path / "data" / "oxford5k" / "jpg"
    gt = tmp_path / "data" / "oxford5k" / "gt_files"
    jpg.mkdir(parents=True)
    gt.mkdir()
    names = [f"tower_{i:06d}" for i in range(6)] + [f"oxford_{i:06d}" for i in range(6)]
    for n in names:
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(jpg / f"{n}.jpg")
    queries = {"tower_1": ("tower_000000", ["tower_000001"], ["tower_000002"], ["tower_000003"]),
               "tower_2": ("tower_000004", ["tower_000005", "tower_000000"], [], ["oxford_000001"])}
    for qid, (img, good, ok, junk) in queries.items():
        (gt / f"{qid}_query.txt").write_text(f"oxc1_{img} 2.0 3.5 38.0 27.0\n")
        for kind, lst in (("good", good), ("ok", ok), ("junk", junk)):
            (gt / f"{qid}_{kind}.txt").write_text("".join(f"{n}\n" for n in lst))
    res = evaluator.run_evaluation(backend=fake_backend(), dataset="oxford5k",
                                   data_root=str(tmp_path / "data"),
                                   output_dir=str(tmp_path / "out"), max_image_size=48)
    assert res["protocol"] == "original" and list(res["metrics"]) == ["original"]
    assert res["counts"]["database"] == 12 and res["counts"]["queries"] == 2
    printed = capsys.readouterr().out
    assert "| Oxf5k" in printed and f"{res['metrics']['original']['mAP']:6.2f}" in printed
    imlist = sorted(names)
    feats = tmp_path / "out" / "features"
    q = extract.merge_shards(str(feats / "oxford5k-queries"),
                             ["tower_000000", "tower_000004"]).descriptors
    db = extract.merge_shards(str(feats / "oxford5k-database"), imlist).descriptors
    ranking = np.argsort(-(q @ db.T), axis=1, kind="stable").T
    g = [{"ok": [imlist.index(n) for n in good + ok], "junk": [imlist.index(n) for n in junk]}
         for _, good, ok, junk in queries.values()]
    ref_map, _, _ = ref_compute_map(ranking, g)
    assert res["metrics"]["original"]["mAP"] == pytest.approx(100 * ref_map, abs=0.006)
