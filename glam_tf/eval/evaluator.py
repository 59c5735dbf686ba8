"""Retrieval evaluation of a GLAM model on ROxf/RPar (+1M), Oxf5k/Par6k or the synthetic set.

`Evaluator(config=EvalConfig(...)).evaluate()` loads the test set, extracts query and
database descriptors (batched, sharded, resumable; glam_tf.eval.extract), searches
exactly (glam_tf.eval.search), scores per EVAL_PROTOCOL.md (glam_tf.eval.metrics) and
writes a JSON record and top-10 pictures (glam_tf.eval.report). `run_evaluation` is the
keyword-only entry point training calls at its end; eval_main.py is the command line.
"""

import dataclasses
import importlib.util
import os
import time

import numpy as np
from absl import logging

from glam_tf.data import testsets
from glam_tf.eval import extract, metrics, models, report, search

DATASETS = testsets.REVISITED + testsets.ORIGINAL
STAGES = ("all", "extract", "evaluate")
UNDECODABLE_POLICY = ("database images that cannot be decoded stay in the database and rank "
                      "last (after every decodable image, by index), so a positive among "
                      "them still counts in AP's denominator; undecodable queries are left "
                      "out of the means")
RESIZE_POLICY = ("Pillow decode (no EXIF rotation), crop queries to bbx, bilinear resize so "
                 "the full image's longer side = max_image_size (query crops keep that "
                 "scale), sides raised to the model minimum at the smallest scale if needed")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (field names = eval_main flag names).

    Attributes:
        dataset: one of DATASETS.
        data_root: folder holding the dataset (`<data_root>/<dataset>/...`).
        output_dir: features, results JSON and pictures go here.
        model: SavedModel directory (version folder or its parent), or
        train_dir: training directory (model_config.json + checkpoints/); exactly one.
        distractors: add the revisitop1m distractors (roxford5k / rparis6k only).
        distractors_root: folder holding `revisitop1m/` (default: data_root).
        max_image_size: longer side of the full images after the client resize.
        scales: multi-scale factors; None = the model's own (a SavedModel's export-time
            scales, else models.DEFAULT_SCALES). Scales other than a SavedModel's export-time
            ones are applied through its serving_default signature, one image per call.
        batch_size: images per model call (same resized size).
        shard_size: images per feature shard file.
        num_shards, shard_index: split extraction over hosts.
        num_workers: image-decoding threads.
        stage: "all" (extract this host's shards, then evaluate when every shard is
            there), "extract" (only extract), "evaluate" (merge + search + metrics; fails
            listing missing shards).
        topk: neighbours kept per query in the JSON.
        visualize: query indices or names to draw with their top 10.
        approx_index: faiss index_factory string (e.g. "HNSW32") to also run approximate
            search and report its recall@approx_k against exact search; "" for none.
        approx_params: faiss search parameters, e.g. "efSearch=128" or "nprobe=16".
        approx_k: k of that recall.
        memory_budget_mb: search temporaries budget; 0 = automatic.
        log_every_s: progress logging interval.
    """

    dataset: str
    data_root: str
    output_dir: str
    model: str = ""
    train_dir: str = ""
    distractors: bool = False
    distractors_root: str = ""
    max_image_size: int = 1024
    scales: tuple = None
    batch_size: int = 8
    shard_size: int = 1000
    num_shards: int = 1
    shard_index: int = 0
    num_workers: int = 2
    stage: str = "all"
    topk: int = 100
    visualize: tuple = ()
    approx_index: str = ""
    approx_params: str = ""
    approx_k: int = 100
    memory_budget_mb: int = 0
    log_every_s: float = 30.0

    def validate(self, *, check_model=True):
        """Raises ValueError naming the field, the rule and the value; cheap checks only."""
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got "
                             f"{self.dataset!r}")
        if self.distractors and self.dataset not in ("roxford5k", "rparis6k"):
            raise ValueError(f"distractors (revisitop1m) go with roxford5k or rparis6k, not "
                             f"dataset={self.dataset!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}; got {self.stage!r}")
        for name in ("max_image_size", "batch_size", "shard_size", "num_shards", "num_workers",
                     "topk", "approx_k"):
            positive_int(name)
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}); got "
                             f"{self.shard_index}")
        if self.memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0 (0 = automatic); got "
                             f"{self.memory_budget_mb}")
        if self.scales is not None:
            try:
                models.check_scales(self.scales)
            except ValueError as e:
                raise ValueError(f"scales: {e}") from None
        if self.approx_index and importlib.util.find_spec("faiss") is None:
            raise ValueError(f"approx_index={self.approx_index!r} needs faiss, an optional "
                             "extra: pip install faiss-cpu==1.15.1 (or leave approx_index "
                             "empty)")
        if not self.data_root:
            raise ValueError("data_root must name the folder holding the dataset")
        if not self.output_dir:
            raise ValueError("output_dir must name a folder for features and results")
        if check_model:
            err = models.check_model_source(self.model, self.train_dir)
            if err:
                raise ValueError(err)

    @property
    def label(self):
        """File-name label, e.g. `roxford5k+1m`."""
        return self.dataset + ("+1m" if self.distractors else "")


def _resolve_visualize(names, testset):
    out = []
    for v in names:
        v = str(v).strip()
        if not v:
            continue
        if v.isdigit() and int(v) < len(testset.qimlist):
            out.append(int(v))
        elif v in testset.qimlist:
            out.append(testset.qimlist.index(v))
        else:
            raise ValueError(f"visualize: {v!r} is neither a query index in "
                             f"[0, {len(testset.qimlist)}) nor a query name of "
                             f"{testset.name}")
    return out


def _round(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 2)


class Evaluator:
    """Evaluates one model on one test set; `evaluate()` returns the results dict.

    Args:
        config: an EvalConfig.
        backend: optional glam_tf.eval.models.DescriptorBackend to use instead of loading
            config.model / config.train_dir (tests, in-process modules).
    """

    def __init__(self, *, config, backend=None):
        config.validate(check_model=backend is None and config.stage != "evaluate")
        self.config = config
        self._backend = backend

    def _splits(self, ts):
        cfg = self.config
        q_items = [extract.ImageItem(n, ts.query_path(n), None if g["bbx"] is None
                                     else tuple(g["bbx"]))
                   for n, g in zip(ts.qimlist, ts.gnd)]
        db_items = [extract.ImageItem(n, ts.image_path(n)) for n in ts.imlist]
        feat = os.path.join(cfg.output_dir, "features")
        splits = [("queries", os.path.join(feat, f"{ts.name}-queries"), q_items),
                  ("database", os.path.join(feat, f"{ts.name}-database"), db_items)]
        if ts.distractors:
            splits.append(("distractors", os.path.join(feat, testsets.DISTRACTORS),
                           [extract.ImageItem(n, ts.distractor_path(n))
                            for n in ts.distractors]))
        return splits

    def evaluate(self):
        """Runs the configured stage; returns the results dict (see module docstring)."""
        cfg = self.config
        t_start = time.time()
        dist_root = (cfg.distractors_root or cfg.data_root) if cfg.distractors else None
        ts = testsets.load_testset(cfg.data_root, cfg.dataset, distractors_root=dist_root)
        vis = _resolve_visualize(cfg.visualize, ts)
        splits = self._splits(ts)
        logging.info("%s: %d queries, %d database images", cfg.label, len(ts.qimlist),
                     ts.num_database)
        extraction = {}
        if cfg.stage in ("all", "extract"):
            backend = self._backend or models.build_backend(
                model=cfg.model, train_dir=cfg.train_dir, scales=cfg.scales,
                max_image_size=cfg.max_image_size)
            logging.info("model: %s", backend.info)
            export_size = backend.info.get("export", {}).get("max_image_size")
            if export_size and export_size != cfg.max_image_size:
                logging.info("full images are resized to max_image_size=%d before the model; "
                             "the export's max_image_size=%d applies only to its "
                             "global_descriptor signatures", cfg.max_image_size, export_size)
            # recorded in every split's manifest: the evaluate stage needs no model
            settings = {"model": backend.info,
                        "scales": list(backend.scales) if backend.scales else None}
            for split, out_dir, items in splits:
                st = extract.extract_split(
                    items, out_dir, backend, max_image_size=cfg.max_image_size,
                    batch_size=cfg.batch_size, shard_size=cfg.shard_size,
                    num_shards=cfg.num_shards, shard_index=cfg.shard_index,
                    num_workers=cfg.num_workers, name=f"{cfg.label} {split}",
                    settings=settings, log_every_s=cfg.log_every_s)
                extraction[split] = {
                    "images_done_this_run": st.images_done, "seconds": round(st.seconds, 2),
                    "images_per_s": round(st.images_done / st.seconds, 2) if st.seconds else None,
                    "shards": st.num_shards_total, "shards_missing": st.missing}
            missing = {s: e["shards_missing"] for s, e in extraction.items() if e["shards_missing"]}
            if cfg.stage == "extract" or missing:
                if missing:
                    logging.info("shards of other hosts still missing (%s); run with "
                                 "--stage=evaluate once every host has finished", missing)
                return {"status": "extracted" if cfg.stage == "extract" else "incomplete",
                        "dataset": cfg.dataset, "distractors": cfg.distractors,
                        "extraction": extraction, "missing_shards": missing}
        return self._score(ts, splits, extraction, vis, t_start)

    def _score(self, ts, splits, extraction, vis, t_start):
        cfg = self.config
        manifests = [extract.read_manifest(out_dir) for _, out_dir, _ in splits]
        keys = ("backend", "max_image_size", "min_side", "settings")
        for (split, out_dir, _), man in zip(splits[1:], manifests[1:]):
            diff = [k for k in keys if man.get(k) != manifests[0].get(k)]
            if diff:
                raise ValueError(f"features in {out_dir} ({split}) and {splits[0][1]} "
                                 f"(queries) were extracted differently ({', '.join(diff)}); "
                                 "extract every split with the same model and settings")
        model_info = manifests[0]["settings"].get("model")
        scales = manifests[0]["settings"].get("scales")
        merged_q = extract.merge_shards(splits[0][1], [it.id for it in splits[0][2]],
                                        num_hosts=cfg.num_shards)
        dim = merged_q.descriptors.shape[1]
        db = np.zeros((ts.num_database, dim), dtype=np.float32)
        db_valid = np.ones(ts.num_database, dtype=bool)
        undecodable = [dict(u, split="queries") for u in merged_q.undecodable]
        enlarged = list(merged_q.enlarged)
        offset = 0
        for split, out_dir, items in splits[1:]:
            n = len(items)
            m = extract.merge_shards(out_dir, [it.id for it in items], num_hosts=cfg.num_shards,
                                     out=db[offset:offset + n])
            db_valid[offset:offset + n] = m.valid
            undecodable += [dict(u, split=split, index=u["index"] + offset)
                            for u in m.undecodable]
            enlarged += m.enlarged
            offset += n
        bad_queries = np.flatnonzero(~merged_q.valid).tolist()
        for q in bad_queries:
            logging.warning("query %d (%s) is undecodable: left out of the means", q,
                            ts.qimlist[q])

        tracked = [np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in ts.gnd]
        k = max(cfg.topk, 10, cfg.approx_k if cfg.approx_index else 0)
        t0 = time.time()
        res = search.exact_search(
            merged_q.descriptors, db, k=k, tracked=tracked, valid=db_valid,
            memory_budget_bytes=(cfg.memory_budget_mb << 20) or None,
            log_every_s=cfg.log_every_s)
        search_s = time.time() - t0
        setups = metrics.SETUPS if ts.protocol == "revisited" else (metrics.ORIGINAL_SETUP,)
        scores = metrics.evaluate_setups(ts.gnd, res.rank_of, setups=setups,
                                         excluded_queries=bad_queries)

        results = {
            "status": "complete",
            "dataset": cfg.dataset,
            "protocol": ts.protocol,
            "distractors": bool(ts.distractors),
            "model": model_info,
            "settings": {
                "max_image_size": manifests[0]["max_image_size"],
                "scales": scales,
                "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
                "num_shards": cfg.num_shards, "descriptor_dim": dim,
                "data_root": os.path.abspath(cfg.data_root), "resize": RESIZE_POLICY,
                "undecodable_policy": UNDECODABLE_POLICY, "similarity": "inner product",
                "search": "exact, chunked",
            },
            "counts": {
                "queries": len(ts.qimlist),
                "queries_evaluated": len(ts.qimlist) - len(bad_queries),
                "database": ts.num_database, "distractors": len(ts.distractors),
                "undecodable_queries": len(bad_queries),
                "undecodable_database": int(np.count_nonzero(~db_valid)),
                "enlarged_to_model_minimum": len(enlarged),
            },
            "metrics": {s: {key: (_round(v) if key != "num_evaluated" else v)
                            for key, v in r.items() if key != "ap"}
                        for s, r in scores.items()},
            "undecodable": undecodable,
            "extraction": extraction,
            "search": {"seconds": round(search_s, 3), "k": k, "chunk_size": res.chunk_size,
                       "query_block": res.query_block},
        }
        results["per_query"] = [
            {"query": name, "valid": q not in bad_queries,
             "ap": {s: (None if scores[s]["ap"][q] is None else round(scores[s]["ap"][q], 6))
                    for s in setups},
             "top": [[ts.database_id(int(i)), round(float(sc), 6)] for i, sc in
                     zip(res.topk_indices[q, :cfg.topk], res.topk_scores[q, :cfg.topk])]}
            for q, name in enumerate(ts.qimlist)]
        if cfg.approx_index:
            results["approx_index"] = self._approximate(merged_q.descriptors, db, db_valid, res)
        label = cfg.label
        outputs = {"json": os.path.join(cfg.output_dir, f"results-{label}.json")}
        if vis:
            entries = []
            for q in vis:
                entries.append({
                    "query": ts.qimlist[q], "query_path": ts.query_path(ts.qimlist[q]),
                    "box": ts.gnd[q]["bbx"],
                    "results": [{"id": ts.database_id(int(i)), "path": ts.database_path(int(i)),
                                 "score": float(sc),
                                 "status": report.result_status(ts.gnd[q], int(i), db_valid)}
                                for i, sc in zip(res.topk_indices[q, :10],
                                                 res.topk_scores[q, :10])]})
            png, page = report.write_visualization(
                entries, os.path.join(cfg.output_dir, f"vis-{label}"),
                title=f"{report.dataset_label(cfg.dataset, cfg.distractors)}: top 10")
            outputs.update(png=png, html=page)
        results["outputs"] = outputs
        results["seconds_total"] = round(time.time() - t_start, 2)
        report.write_json(results, outputs["json"])
        return results

    def _approximate(self, queries, db, valid, exact):
        cfg = self.config
        idx, _, build_s, search_s = search.approximate_search(
            queries, db, k=cfg.approx_k, index_spec=cfg.approx_index,
            params=cfg.approx_params, valid=valid)
        return {"index": cfg.approx_index, "params": cfg.approx_params, "k": cfg.approx_k,
                "recall_at_k": round(search.recall_at_k(idx, exact.topk_indices, cfg.approx_k), 4),
                "build_seconds": round(build_s, 3), "search_seconds": round(search_s, 3)}


def run_evaluation(*, dataset, data_root, output_dir, model="", train_dir="", backend=None,
                   print_table=True, **kwargs):
    """Evaluates a SavedModel (`model`) or training directory (`train_dir`) on `dataset`.

    The entry point training calls at its end; other EvalConfig fields go in kwargs.
    Prints the paper-layout table (when print_table) and returns the results dict.
    """
    config = EvalConfig(dataset=dataset, data_root=data_root, output_dir=output_dir,
                        model=model, train_dir=train_dir, **kwargs)
    results = Evaluator(config=config, backend=backend).evaluate()
    if results["status"] == "complete" and print_table:
        print(report.format_table(results), flush=True)
        print(f"results: {results['outputs']['json']}", flush=True)
    return results
