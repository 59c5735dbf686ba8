"""Retrieval evaluation of a GLAM model on ROxf/RPar (+1M), Oxf5k/Par6k or the synthetic set.

`Evaluator(config=EvalConfig(...)).evaluate()` loads the test set, extracts query and
database descriptors (batched, sharded, resumable; glam_tf.eval.extract), searches
exactly (glam_tf.eval.search), scores per EVAL_PROTOCOL.md (glam_tf.eval.metrics) and
writes a JSON record and top-10 pictures (glam_tf.eval.report), with
--visualize_attention their spatial attention maps too (glam_tf.eval.attention_vis). With
search-time refinements (config.refine: alpha-DBA, alpha-QE, re-ranking; glam_tf.eval.refine)
the metrics are those of the refined ranking, next to the plain ones (`refinement`).
`run_evaluation` runs an EvalConfig, `evaluate_model` an in-memory model (what training
calls); eval_main.py is the command line. EvalConfig lives in glam_tf.config.
"""

import dataclasses
import json
import time

import numpy as np
from absl import logging

from glam_tf import files
from glam_tf.config import contract
from glam_tf.config.eval import EvalConfig
from glam_tf.data import testsets
from glam_tf.eval import (attention_vis, extract, extract_beam, metrics, models, refine,
                          report, search)

UNDECODABLE_POLICY = ("database images that cannot be decoded stay in the database and rank "
                      "last (after every decodable image, by index), so a positive among "
                      "them still counts in AP's denominator; undecodable queries are left "
                      "out of the means")
RESIZE_POLICY = ("Pillow decode (no EXIF rotation), crop queries to bbx, bilinear resize so "
                 "the full image's longer side = max_image_size (query crops keep that "
                 "scale), sides raised to the model minimum at the smallest scale if needed")
# Queries whose attention maps give the ranges recorded with a Keras model's results.
RANGE_QUERIES = 8


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
            config.model / config.train_dir (tests, in-process modules); extraction then
            runs in this process, unless `backend_factory` is given too.
        backend_factory: picklable callable building the back-end in a Beam worker. A model
            loaded from config.model / config.train_dir is extracted by the Beam pipeline
            (glam_tf.eval.extract_beam) with `BackendSpec(...).build` as its factory.
        beam_args: Beam flags of that pipeline (None: DirectRunner, one in-memory worker;
            see glam_tf.eval.extract_beam.local_args).
    """

    def __init__(self, *, config, backend=None, backend_factory=None, beam_args=None):
        config.validate(check_model=backend is None and config.stage != "evaluate")
        self.config = config
        self._backend = backend
        self._backend_factory = backend_factory
        self._beam_args = beam_args
        self._attention = None   # (keras model, map names) with --visualize_attention
        self._map_ranges = None  # attention map ranges of a Keras model with GLAM
        self._backend_min_side = 1

    def _attention_source(self, backend):
        """(Keras model, maps it has) for --visualize_attention, checked before extraction."""
        if not self.config.visualize_attention:
            return None
        if backend.keras_model is None:
            raise ValueError(
                f"--visualize_attention needs the Keras model; the {backend.info.get('kind')} "
                "back-end has none (a SavedModel's signatures return descriptors only). "
                "Evaluate the training directory with --train_dir instead.")
        return backend.keras_model, attention_vis.check_model(backend.keras_model)

    def _splits(self, ts):
        cfg = self.config
        q_items = [extract.ImageItem(n, ts.query_path(n), None if g["bbx"] is None
                                     else tuple(g["bbx"]))
                   for n, g in zip(ts.qimlist, ts.gnd)]
        db_items = [extract.ImageItem(n, ts.image_path(n)) for n in ts.imlist]
        feat = files.join(cfg.output_dir, "features")
        splits = [("queries", files.join(feat, f"{ts.name}-queries"), q_items)]
        if cfg.search_index:   # the index holds the database
            return splits
        splits.append(("database", files.join(feat, f"{ts.name}-database"), db_items))
        if ts.distractors:
            splits.append(("distractors", files.join(feat, testsets.DISTRACTORS),
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
            factory = self._backend_factory
            if factory is None and self._backend is None:
                factory = extract_beam.BackendSpec(
                    model=cfg.model, train_dir=cfg.train_dir, scales=cfg.scales,
                    max_image_size=cfg.max_image_size, inference=cfg.inference).build
            # loaded once per process: the local pipeline's in-memory worker reuses it
            backend = self._backend or factory()
            logging.info("model: %s", backend.info)
            self._attention = self._attention_source(backend)
            self._backend_min_side = backend.min_side()
            self._map_ranges = self._attention_ranges(ts, backend.keras_model)
            export_size = backend.info.get("export", {}).get("max_image_size")
            if export_size and export_size != cfg.max_image_size:
                logging.info("full images are resized to max_image_size=%d before the model; "
                             "the export's max_image_size=%d applies only to its "
                             "global_descriptor signatures", cfg.max_image_size, export_size)
            # recorded in every split's manifest: the evaluate stage needs no model
            settings = {"model": backend.info,
                        "scales": list(backend.scales) if backend.scales else None}
            if factory is not None:  # one Beam pipeline over every split's shards
                statuses, counters = extract_beam.extract_splits(
                    [(items, out_dir, f"{cfg.label} {split}") for split, out_dir, items in splits],
                    backend, factory, beam_args=self._beam_args,
                    max_image_size=cfg.max_image_size, batch_size=cfg.batch_size,
                    shard_size=cfg.shard_size, num_shards=cfg.num_shards,
                    shard_index=cfg.shard_index, num_workers=cfg.num_workers,
                    settings=settings)
                logging.info("extraction pipeline counters: %s", counters)
            else:  # an in-memory back-end (training's evaluation): in this process
                statuses = [extract.extract_split(
                    items, out_dir, backend, max_image_size=cfg.max_image_size,
                    batch_size=cfg.batch_size, shard_size=cfg.shard_size,
                    num_shards=cfg.num_shards, shard_index=cfg.shard_index,
                    num_workers=cfg.num_workers, name=f"{cfg.label} {split}",
                    settings=settings, log_every_s=cfg.log_every_s)
                    for split, out_dir, items in splits]
            for (split, out_dir, items), st in zip(splits, statuses):
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
        """The stages after extraction: merge -> search -> refine -> score -> report."""
        cfg = self.config
        features = merge_features(ts, splits, num_hosts=cfg.num_shards)
        tracked = tracked_images(ts)
        if cfg.search_index:
            features, ranking = search_index(cfg.search_index, features, tracked, ts,
                                             k=search_depth(cfg))
        else:
            ranking = search_features(features, tracked, cfg)
        ranking = refine_ranking(features, tracked, cfg.refine, ranking,
                                 memory_budget_bytes=_budget(cfg), log_every_s=cfg.log_every_s)
        scores = score_ranking(ts, features, ranking)
        results = results_record(cfg, ts, features, ranking, scores, extraction)
        if cfg.approx_index:
            results["approx_index"] = self._approximate(
                features.queries, features.database, features.database_valid, ranking.exact)
        outputs = self._draw(ts, features, ranking, vis)
        if self._map_ranges is not None:
            results["attention_ranges"] = self._map_ranges
        results["outputs"] = outputs
        results["seconds_total"] = round(time.time() - t_start, 2)
        report.write_json(results, outputs["json"])
        return results

    def _draw(self, ts, features, ranking, vis) -> dict:
        """The report's pictures: each --visualize query and its top 10 (and, with
        --visualize_attention, their attention maps); returns the outputs' paths."""
        cfg = self.config
        outputs = {"json": results_path(cfg)}
        if not vis:
            return outputs
        res = ranking.final
        entries = []
        for q in vis:
            entries.append({
                "query": ts.qimlist[q], "query_path": ts.query_path(ts.qimlist[q]),
                "box": ts.gnd[q]["bbx"],
                "results": [{"id": ts.database_id(int(i)), "path": ts.database_path(int(i)),
                             "score": float(sc),
                             "status": report.result_status(ts.gnd[q], int(i),
                                                            features.database_valid)}
                            for i, sc in zip(res.topk_indices[q, :10],
                                             res.topk_scores[q, :10])]})
        png, page = report.write_visualization(
            entries, files.join(cfg.output_dir, f"vis-{cfg.label}"),
            title=f"{report.dataset_label(cfg.dataset, cfg.distractors)}: each query and its "
                  "top 10, framed by status under the Medium setup")
        outputs.update(png=png, html=page)
        if self._attention is not None:
            outputs["attention_png"] = self._draw_attention(ts, entries, vis)
        return outputs

    def _attention_ranges(self, ts, model):
        """`attention_vis.attention_statistics` over the first RANGE_QUERIES queries as the
        model sees them (client resize at max_image_size, scale 1): each map's range, and
        the global spatial map's spread when the variant has one; None without a Keras
        model with a GLAM module (a SavedModel, the baseline)."""
        if model is None or not attention_vis.has_glam(model):
            return None
        images = [self._image_as_seen(extract.ImageItem(
            name, ts.query_path(name), None if g["bbx"] is None else tuple(g["bbx"])))
            for name, g in list(zip(ts.qimlist, ts.gnd))[:RANGE_QUERIES]]
        images = [image for image in images if image is not None]
        ranges, spread = attention_vis.attention_statistics(model, images)
        logging.info("attention map ranges over %d queries: %s", len(images), ", ".join(
            f"{k} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in ranges.items()))
        if not spread:
            return {"queries": len(images), "maps": ranges}
        logging.info("global spatial attention: %.2f effective positions of %.1f, top "
                     "weight %.3f", spread["effective_positions"], spread["positions"],
                     spread["top_weight"])
        return {"queries": len(images), "maps": ranges, "global_spatial_spread": spread}

    def _image_as_seen(self, item):
        """`item`'s image as the model sees it (client resize at max_image_size, scale 1),
        or None when it cannot be decoded."""
        try:
            size, _ = extract.target_size(*extract.read_size(item.path), item.box,
                                          self.config.max_image_size, self._backend_min_side)
            return extract.load_image(item, size)
        except extract.UndecodableImage:
            return None

    def _draw_attention(self, ts, entries, vis):
        """attention.png beside top10.png: each query and its top results as the model saw
        them (client resize at max_image_size, first scale 1), with their spatial maps."""
        cfg = self.config
        model, map_names = self._attention
        rows = []
        for q, entry in zip(vis, entries):
            items = [(extract.ImageItem(entry["query"], entry["query_path"],
                                        None if entry["box"] is None else tuple(entry["box"])),
                      entry["query"], "query")]
            items += [(extract.ImageItem(r["id"], r["path"]),
                       report.result_label(k + 1, r["score"]), r["status"])
                      for k, r in enumerate(entry["results"][:attention_vis.TOP])]
            images = []
            for item, label, status in items:
                image = self._image_as_seen(item)
                if image is None:
                    continue   # left out of the row (its neighbours move up)
                images.append({"label": label, "status": status, "image": image,
                               "maps": attention_vis.spatial_attention(
                                   model, image, position=cfg.attention_position)})
            rows.append({"query": ts.qimlist[q], "images": images})
        path = attention_vis.write_attention_visualization(
            rows, files.join(cfg.output_dir, f"vis-{cfg.label}"), map_names=map_names,
            position=cfg.attention_position,
            title=f"{report.dataset_label(cfg.dataset, cfg.distractors)}: GLAM's spatial "
                  f"attention over {len(rows)} quer{'y' if len(rows) == 1 else 'ies'} and "
                  f"{'its' if len(rows) == 1 else 'their'} top {attention_vis.TOP} "
                  f"(images at {cfg.max_image_size} px, scale 1)")
        logging.info("attention maps of %d queries: %s", len(rows), path)
        return path

    def _approximate(self, queries, db, valid, exact):
        cfg = self.config
        idx, _, build_s, search_s = search.approximate_search(
            queries, db, k=cfg.approx_k, index_spec=cfg.approx_index,
            params=cfg.approx_params, valid=valid)
        return {"index": cfg.approx_index, "params": cfg.approx_params, "k": cfg.approx_k,
                "recall_at_k": round(search.recall_at_k(idx, exact.topk_indices, cfg.approx_k), 4),
                "build_seconds": round(build_s, 3), "search_seconds": round(search_s, 3)}


# ----------------------------------------------------------------------------------------
# The stages after extraction, each callable alone: merge -> search -> refine -> score ->
# report (results_record; Evaluator._draw adds the pictures).

@dataclasses.dataclass
class Features:
    """The extracted descriptors of one test set, merged from every host's shards.

    Attributes:
        queries: (Q, D) float32 unit descriptors (zeros for an undecodable query).
        database: (N, D) float32, the database then the distractors.
        database_valid: (N,) bool, False for an undecodable database image.
        bad_queries: indices of the undecodable queries (left out of the means).
        undecodable: one record per undecodable image (split, index, id, reason).
        enlarged: the images raised to the model's minimum side.
        manifest: the queries' extraction manifest (model, resize and settings).
    """

    queries: np.ndarray
    database: np.ndarray
    database_valid: np.ndarray
    bad_queries: list
    undecodable: list
    enlarged: list
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.queries.shape[1])


@dataclasses.dataclass
class Ranking:
    """The search stage's rankings: `exact` from search_features, `final` after
    refine_ranking (the exact one when no refinement ran), with their costs."""

    exact: search.SearchResult
    k: int
    search_seconds: float
    final: search.SearchResult = None
    refine_seconds: dict = None
    method: str = "exact, chunked"

    def __post_init__(self):
        if self.final is None:
            self.final = self.exact


@dataclasses.dataclass
class Scores:
    """Per setup (metrics.evaluate_setups) the scores of the final ranking, and of the
    exact one when a refinement ran."""

    setups: tuple
    final: dict
    without_refinement: dict = None


def merge_features(ts, splits, *, num_hosts: int) -> Features:
    """Reads every split's shards (queries first, then database and distractors) into one
    `Features`; refuses splits extracted with other models or settings."""
    manifests = [extract.read_manifest(out_dir) for _, out_dir, _ in splits]
    keys = ("backend", "max_image_size", "min_side", "settings")
    for (split, out_dir, _), man in zip(splits[1:], manifests[1:]):
        diff = [k for k in keys if man.get(k) != manifests[0].get(k)]
        if diff:
            raise ValueError(f"features in {out_dir} ({split}) and {splits[0][1]} "
                             f"(queries) were extracted differently ({', '.join(diff)}); "
                             "extract every split with the same model and settings")
    merged_q = extract.merge_shards(splits[0][1], [it.id for it in splits[0][2]],
                                    num_hosts=num_hosts)
    dim = merged_q.descriptors.shape[1]
    db = np.zeros((ts.num_database, dim), dtype=np.float32)
    db_valid = np.ones(ts.num_database, dtype=bool)
    undecodable = [dict(u, split="queries") for u in merged_q.undecodable]
    enlarged = list(merged_q.enlarged)
    offset = 0
    for split, out_dir, items in splits[1:]:
        n = len(items)
        m = extract.merge_shards(out_dir, [it.id for it in items], num_hosts=num_hosts,
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
    return Features(queries=merged_q.descriptors, database=db, database_valid=db_valid,
                    bad_queries=bad_queries, undecodable=undecodable, enlarged=enlarged,
                    manifest=manifests[0])


def tracked_images(ts) -> list:
    """Per query the database indices whose ranks AP needs: easy, hard and junk."""
    return [np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in ts.gnd]


def search_depth(cfg) -> int:
    """k of the search: enough for the stored top, the pictures, the approximate search's
    recall and the refinements' neighbours."""
    rcfg = cfg.refine
    return max(cfg.topk, 10, cfg.approx_k if cfg.approx_index else 0,
               rcfg.rerank_m if rcfg.rerank else 0,
               rcfg.qe_neighbors if rcfg.query_expansion else 0)


def _budget(cfg):
    return (cfg.memory_budget_mb << 20) or None


def search_features(features: Features, tracked, cfg) -> Ranking:
    """Exact search of the queries in the database (glam_tf.eval.search)."""
    k = search_depth(cfg)
    t0 = time.time()
    res = search.exact_search(
        features.queries, features.database, k=k, tracked=tracked,
        valid=features.database_valid, memory_budget_bytes=_budget(cfg),
        log_every_s=cfg.log_every_s)
    return Ranking(exact=res, k=k, search_seconds=time.time() - t0)


def search_index(path, features: Features, tracked, ts, *, k: int):
    """The search stage done by a search-index SavedModel (glam_tf.search_index) instead of
    the extracted database: its whole ranking of each query (k = its number of images) as
    a SearchResult over the test set's database order, images it lacks ranked last (by
    index, as undecodable ones). Returns (`features` with their database validity, Ranking).

    Raises:
        ValueError (one line): an index holding more images than its max_k (AP needs every
            positive's rank), of another descriptor width, or with ids that are not
            database image names of the test set.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    version = contract.resolve_saved_model_dir(path)
    info = files.read_json(files.join(version, contract.INDEX_INFO_FILE))
    size, max_k, batch = info["num_images"], info["max_k"], info["max_queries"]
    if size > max_k:
        raise ValueError(f"--search_index: {version} holds {size} images, more than its "
                         f"max_k={max_k}; AP needs the rank of every positive, so the whole "
                         f"ranking: rebuild it with --max_k={size} or more")
    if info["descriptor_dim"] != features.dim:
        raise ValueError(f"--search_index: {version} holds descriptors of width "
                         f"{info['descriptor_dim']}, the model's are {features.dim}")
    position = {name: i for i, name in enumerate(ts.database_ids())}
    search_fn = tf.saved_model.load(version).signatures["search_from_descriptors"]
    t0 = time.time()
    ids, scores = [], []
    for start in range(0, len(features.queries), batch):
        out = search_fn(descriptors=tf.constant(features.queries[start:start + batch]),
                        k=tf.constant(size, tf.int32))
        ids.append(out["ids"].numpy())
        scores.append(out["scores"].numpy())
    ids, scores = np.concatenate(ids), np.concatenate(scores)
    unknown = sorted({i.decode() for i in ids[0]} - set(position))
    if unknown:
        raise ValueError(f"--search_index: {version} holds {len(unknown)} image(s) that are "
                         f"not in the database of {ts.name}, e.g. {unknown[0]!r}")
    ranked = np.vectorize(lambda i: position[i.decode()], otypes=[np.int64])(ids)
    valid = np.zeros(ts.num_database, bool)
    valid[ranked[0]] = True
    lacking = np.flatnonzero(~valid)
    order = np.concatenate([ranked, np.broadcast_to(lacking, (len(ranked), lacking.size))], 1)
    order_scores = np.concatenate(
        [scores, np.full((len(ranked), lacking.size), -np.inf, np.float32)], 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    tracked = [np.unique(np.asarray(t, np.int64)) for t in tracked]
    result = search.SearchResult(
        topk_indices=order[:, :k], topk_scores=order_scores[:, :k], tracked=tracked,
        tracked_ranks=[rank[q, t] for q, t in enumerate(tracked)], query_block=batch)
    return (dataclasses.replace(features, database_valid=valid),
            Ranking(exact=result, k=k, search_seconds=time.time() - t0,
                    method=f"exact, search index {files.absolute(version)}"))


def refine_ranking(features: Features, tracked, cfg, ranking: Ranking, *,
                   memory_budget_bytes=None, log_every_s=30.0) -> Ranking:
    """`ranking` with the search-time refinements of `cfg` (a RefineConfig: alpha-DBA,
    alpha-QE, re-ranking; glam_tf.eval.refine) applied, or as it is when none is on."""
    if not cfg.enabled:
        return ranking
    res, seconds = refine.refine_and_search(
        features.queries, features.database, cfg, tracked=tracked,
        valid=features.database_valid, k=ranking.k, memory_budget_bytes=memory_budget_bytes,
        log_every_s=log_every_s, base=ranking.exact)
    return dataclasses.replace(ranking, final=res, refine_seconds=seconds)


def score_ranking(ts, features: Features, ranking: Ranking) -> Scores:
    """mAP and mP@k per setup of EVAL_PROTOCOL.md (the revisited Easy/Medium/Hard, or the
    original protocol's one) of the final ranking, and of the exact one when refined."""
    setups = metrics.SETUPS if ts.protocol == "revisited" else (metrics.ORIGINAL_SETUP,)

    def scored(res):
        return metrics.evaluate_setups(ts.gnd, res.rank_of, setups=setups,
                                       excluded_queries=features.bad_queries)

    if ranking.final is ranking.exact:
        return Scores(setups=setups, final=scored(ranking.exact))
    return Scores(setups=setups, final=scored(ranking.final),
                  without_refinement=scored(ranking.exact))


def _ap(scores, setups, q):
    return {s: (None if scores[s]["ap"][q] is None else round(scores[s]["ap"][q], 6))
            for s in setups}


def results_record(cfg, ts, features: Features, ranking: Ranking, scores: Scores,
                   extraction) -> dict:
    """The results JSON (module doc): settings, counts, metrics, refinement, search costs
    and the per-query records with the stored top."""
    bad_queries, db_valid = features.bad_queries, features.database_valid
    results = {
        "status": "complete",
        "dataset": cfg.dataset,
        "protocol": ts.protocol,
        "distractors": bool(ts.distractors),
        "model": features.manifest["settings"].get("model"),
        "settings": {
            "max_image_size": features.manifest["max_image_size"],
            "scales": features.manifest["settings"].get("scales"),
            "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
            "num_shards": cfg.num_shards, "descriptor_dim": features.dim,
            "data_root": files.absolute(cfg.data_root), "resize": RESIZE_POLICY,
            "undecodable_policy": UNDECODABLE_POLICY, "similarity": "inner product",
            "search": ranking.method,
        },
        "counts": {
            "queries": len(ts.qimlist),
            "queries_evaluated": len(ts.qimlist) - len(bad_queries),
            "database": ts.num_database, "distractors": len(ts.distractors),
            "undecodable_queries": len(bad_queries),
            "undecodable_database": int(np.count_nonzero(~db_valid)),
            "enlarged_to_model_minimum": len(features.enlarged),
        },
        "metrics": _metrics_record(scores.final),
        "undecodable": features.undecodable,
        "extraction": extraction,
        "search": {"seconds": round(ranking.search_seconds, 3), "k": ranking.k,
                   "chunk_size": ranking.exact.chunk_size,
                   "query_block": ranking.exact.query_block},
    }
    if ranking.refine_seconds is not None:
        results["refinement"] = refinement_record(
            cfg.refine, ranking.refine_seconds, len(ts.qimlist), ts.num_database,
            scores.without_refinement)
    res, setups, top = ranking.final, scores.setups, cfg.topk
    results["per_query"] = [
        {"query": name, "valid": q not in bad_queries,
         "ap": _ap(scores.final, setups, q),
         **({} if scores.without_refinement is None else {
             "ap_without_refinement": _ap(scores.without_refinement, setups, q)}),
         "top": [[ts.database_id(int(i)), round(float(sc), 6)] for i, sc in
                 zip(res.topk_indices[q, :top], res.topk_scores[q, :top])]}
        for q, name in enumerate(ts.qimlist)]
    return results


def _metrics_record(scores):
    return {s: {key: (_round(v) if key != "num_evaluated" else v)
                for key, v in r.items() if key != "ap"} for s, r in scores.items()}


def refinement_record(config, seconds, num_queries, num_database, base_scores):
    """The results JSON's `refinement`: what ran, with its parameters, its time, and the
    metrics without it (the results' `metrics` are with it)."""
    per_query = {name: round(1000.0 * s / max(1, num_queries), 3)
                 for name, s in seconds.items() if name != "database_augmentation"}
    record = {"ran": list(config.enabled), "parameters": config.info(),
              "seconds": {name: round(s, 4) for name, s in seconds.items()},
              "ms_per_query": per_query,
              "metrics_without": _metrics_record(base_scores)}
    if "database_augmentation" in seconds:
        record["dba_ms_per_database_image"] = round(
            1000.0 * seconds["database_augmentation"] / max(1, num_database), 4)
    return record


def run_evaluation(config=None, *, backend=None, beam_args=None, print_table=True, **fields):
    """Evaluates `config` (an EvalConfig, or one made of `fields`); returns the results.

    Prints the paper-layout table (when print_table). `backend`: a DescriptorBackend to use
    instead of loading config.model / config.train_dir (extracted in this process); else
    the extraction is a Beam pipeline run with `beam_args` (None: DirectRunner, one in-memory worker).
    """
    config = config if config is not None else EvalConfig(**fields)
    results = Evaluator(config=config, backend=backend, beam_args=beam_args).evaluate()
    if results["status"] == "complete" and print_table:
        print(report.format_table(results), flush=True)
        print(f"results: {results['outputs']['json']}", flush=True)
    return results


def evaluate_model(model, config, *, tag: str) -> dict:
    """Evaluates an in-memory Keras descriptor model (the eval back-end training uses).

    The model goes through its serving module (the functions the SavedModel exports) at
    config.scales (default: the paper's), fed images resized to config.max_image_size;
    config.output_dir is replaced. `tag` names the model in the results (e.g.
    `<train_dir>@step_<n>`).
    """
    files.rmtree(config.output_dir)
    backend = models.from_keras_model(model, scales=config.scales,
                                      max_image_size=config.max_image_size,
                                      info={"kind": "in-memory model", "model": tag},
                                      fingerprint=f"model:{tag}", inference=config.inference)
    print(f"Evaluation of {tag} on {config.label}:", flush=True)
    return run_evaluation(config, backend=backend)


def results_path(config) -> str:
    """Where the evaluation of `config` writes its results JSON."""
    return files.join(config.output_dir, f"results-{config.label}.json")


def read_results(config):
    """The results dict an earlier evaluation of `config` wrote, or None."""
    path = results_path(config)
    if not files.isfile(path):
        return None
    with files.open_file(path) as f:
        return json.load(f)
