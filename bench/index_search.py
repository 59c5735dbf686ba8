"""Benchmark: the search index SavedModel against the bare NumPy product, 1M x 512.

Builds an index (glam_tf.search_index, descriptors only) of --num_db random unit
descriptors, saves it, and:
- equality: the loaded model's search_from_descriptors against
  glam_tf.eval.search.exact_search for --num_queries queries (ids and order identical,
  the largest score difference);
- latency: per request, B = each of --batches queries, top --k, through the loaded
  SavedModel, as a ratio to `queries @ database.T` in the same process (bench/harness.py:
  warmed up, order rotated, median of --rounds with the per-round spread);
- serving cost, in a fresh process that only loads the index (as a server does): load time,
  resident memory after the load, and the peak resident memory while answering requests of
  max(--batches) queries, each against the database's size (Linux: /proc/self/status VmHWM,
  reset through /proc/self/clear_refs before the requests).

  .venv/bin/python bench/index_search.py                       # 1M x 512: 2 GB float32
  .venv/bin/python bench/index_search.py --num_db=100000 --storage=bfloat16

With --features=<an evaluation's features folder> (eval_main's <output_dir>/features, or a
training run's eval/step_<n>/features) it measures storage alone on real descriptors
instead: each storage's top --k through the index module against exact_search of the
float32 descriptors (order, recall@k, the largest score difference, and the float64 gap of
any pair ranked the other way round).

Prints the machine line first and one JSON line of results last.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
import harness  # noqa: E402  (this folder)


def _unit_rows(rng, n, d, chunk=10_000):
    """(n, d) float32 unit rows, generated in chunks (small temporaries)."""
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), d), dtype=np.float32)
        out[a:a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _status_kb(field):
    """A /proc/self/status memory field (VmRSS, VmHWM) in kB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def serve(args):
    """The serving process: load the index, answer requests; prints one JSON line."""
    import tensorflow as tf  # noqa: PLC0415

    rss_before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loaded = tf.saved_model.load(args.serve)
    load_s = time.perf_counter() - t0
    fn = loaded.signatures["search_from_descriptors"]
    rss_loaded = _status_kb("VmRSS")
    queries = _unit_rows(np.random.default_rng(1), args.batch, args.dim)
    t0 = time.perf_counter()
    fn(descriptors=tf.constant(queries), k=tf.constant(args.k))
    first_s = time.perf_counter() - t0
    rss_idle = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")   # resets VmHWM to the current RSS
    for _ in range(3):
        fn(descriptors=tf.constant(queries), k=tf.constant(args.k))
    print(json.dumps({"load_s": load_s, "first_request_s": first_s,
                      "rss_before_load_mb": rss_before / 1024,
                      "rss_after_load_mb": rss_loaded / 1024,
                      "rss_after_first_request_mb": rss_idle / 1024,
                      "peak_during_requests_mb": _status_kb("VmHWM") / 1024}))


def storage_recall(args):
    """--features: each storage's top-k on an evaluation's descriptors; one JSON line."""
    import tensorflow as tf  # noqa: PLC0415

    from glam_tf import files  # noqa: PLC0415
    from glam_tf.config import IndexConfig  # noqa: PLC0415
    from glam_tf.eval import search  # noqa: PLC0415
    from glam_tf import search_index as index  # noqa: PLC0415

    splits = sorted(files.listdir(args.features))
    names = [n[:-len("-queries")] for n in splits if n.endswith("-queries")]
    if not names or f"{names[0]}-database" not in splits:
        raise SystemExit(f"index_search: error: --features={args.features} holds no "
                         "<test set>-queries and <test set>-database shard folders")
    db = index.read_descriptor_shards(files.join(args.features, f"{names[0]}-database"))
    queries = index.read_descriptor_shards(
        files.join(args.features, f"{names[0]}-queries")).descriptors
    k = min(args.k, len(db.ids))
    exact = search.exact_search(queries, db.descriptors, k=k)
    wide = queries.astype(np.float64) @ db.descriptors.astype(np.float64).T
    results = {"machine": harness.machine(), "features": args.features, "test_set": names[0],
               "database": len(db.ids), "queries": len(queries), "k": k}
    for storage in ("float32", "bfloat16", "float16"):
        module = index.SearchIndexModule(db, IndexConfig(storage=storage,
                                                         max_queries=len(queries)))
        got = module.search_from_descriptors(tf.constant(queries), tf.constant(k, tf.int32))
        got_idx = got["indices"].numpy()
        swapped = np.argwhere(got_idx != exact.topk_indices)
        gaps = [abs(wide[q, got_idx[q, j]] - wide[q, exact.topk_indices[q, j]])
                for q, j in swapped]
        results[storage] = {
            "recall_at_k": round(float(np.mean([len(set(a) & set(b)) / k for a, b in
                                                zip(got_idx, exact.topk_indices)])), 5),
            "order_identical_rows": int(np.all(got_idx == exact.topk_indices, axis=1).sum()),
            "max_score_difference": float(np.abs(got["scores"].numpy()
                                                 - exact.topk_scores).max()),
            "largest_float64_gap_of_a_swapped_pair": float(max(gaps, default=0.0))}
        print(f"{storage}: recall@{k} {results[storage]['recall_at_k']}, order identical in "
              f"{results[storage]['order_identical_rows']}/{len(queries)} rows", flush=True)
    print(json.dumps(results))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_db", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batches", default="1,8,70", help="queries per request, comma-separated")
    p.add_argument("--num_queries", type=int, default=70, help="queries of the equality check")
    p.add_argument("--storage", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--memory_budget_mb", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--work_dir", default="", help="where the index is written (default: a "
                   "temporary folder, deleted after)")
    p.add_argument("--features", default="", help="an evaluation's features folder: measure "
                   "each storage's recall on its descriptors instead (module doc)")
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)   # the serving process
    p.add_argument("--batch", type=int, default=70, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return
    if args.features:
        print(harness.header(), flush=True)
        storage_recall(args)
        return
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: {args.batches!r} is not a comma-separated list of integers")
    if min(batches) < 1 or args.k < 1 or args.k > args.num_db:
        p.error(f"--batches must be >= 1 and 1 <= --k <= --num_db; got --batches="
                f"{args.batches} --k={args.k} --num_db={args.num_db}")
    print(harness.header(), flush=True)
    import tensorflow as tf  # noqa: PLC0415

    from glam_tf.config import IndexConfig  # noqa: PLC0415
    from glam_tf.eval import search  # noqa: PLC0415
    from glam_tf import search_index as index  # noqa: PLC0415

    rng = np.random.default_rng(0)
    database = _unit_rows(rng, args.num_db, args.dim)
    db_mb = database.nbytes / 2**20
    stored_mb = db_mb * (1 if args.storage == "float32" else 0.5)
    config = IndexConfig(storage=args.storage, memory_budget_mb=args.memory_budget_mb,
                         max_queries=max(max(batches), args.num_queries),
                         max_k=max(args.k, 1000))
    with tempfile.TemporaryDirectory(dir=args.work_dir or None) as work:
        t0 = time.perf_counter()
        module = index.SearchIndexModule(
            index.Database(database, [f"img{i:07d}" for i in range(args.num_db)]), config)
        path = index.save_index(module, os.path.join(work, "index"))
        del module
        build_s = time.perf_counter() - t0
        print(f"built and saved the index ({args.num_db} x {args.dim} {args.storage}) in "
              f"{build_s:.1f} s", flush=True)

        served = subprocess.run([sys.executable, __file__, f"--serve={path}",
                                 f"--batch={max(batches)}", f"--dim={args.dim}",
                                 f"--k={args.k}"], capture_output=True, text=True, check=True)
        serving = json.loads(served.stdout.strip().splitlines()[-1])
        print(f"serving process: load {serving['load_s']:.2f} s, RSS after load "
              f"{serving['rss_after_load_mb']:.0f} MB (before {serving['rss_before_load_mb']:.0f}"
              f"), peak during {max(batches)}-query requests "
              f"{serving['peak_during_requests_mb']:.0f} MB; stored database {stored_mb:.0f} MB",
              flush=True)

        loaded = tf.saved_model.load(path)
        fn = loaded.signatures["search_from_descriptors"]

        def ask(queries):
            return fn(descriptors=tf.constant(queries), k=tf.constant(args.k))

        queries = _unit_rows(rng, args.num_queries, args.dim)
        got = ask(queries)
        exact = search.exact_search(queries, database, k=args.k)
        got_indices = got["indices"].numpy()
        same_rows = int(np.all(got_indices == exact.topk_indices, axis=1).sum())
        same_sets = int(sum(set(a) == set(b) for a, b in zip(got_indices, exact.topk_indices)))
        worst = float(np.abs(got["scores"].numpy() - exact.topk_scores).max())
        ids_ok = bool(np.all(got["ids"].numpy().astype(str)
                             == np.char.add("img", np.char.zfill(
                                 exact.topk_indices.astype(str), 7))))
        print(f"equality vs exact_search ({args.num_queries} queries, top {args.k}): order "
              f"identical in {same_rows}/{args.num_queries} rows, same sets in "
              f"{same_sets}/{args.num_queries}, ids {'identical' if ids_ok else 'DIFFER'}, "
              f"max |score difference| {worst:.2e}", flush=True)

        results = {"machine": harness.machine(), "num_db": args.num_db, "dim": args.dim,
                   "storage": args.storage, "k": args.k, "build_and_save_s": round(build_s, 1),
                   "database_mb": round(db_mb), "stored_mb": round(stored_mb),
                   "serving": {k: round(v, 2) for k, v in serving.items()},
                   "peak_over_stored": round(
                       (serving["peak_during_requests_mb"] - serving["rss_before_load_mb"])
                       / stored_mb, 3),
                   "load_rss_over_stored": round(
                       (serving["rss_after_load_mb"] - serving["rss_before_load_mb"])
                       / stored_mb, 3),
                   "equality": {"queries": args.num_queries, "order_identical_rows": same_rows,
                                "same_set_rows": same_sets, "ids_identical": ids_ok,
                                "max_score_difference": worst},
                   "latency": {}}
        for batch in batches:
            q = _unit_rows(rng, batch, args.dim)
            legs = harness.compare({"index": lambda q=q: ask(q),
                                    "numpy": lambda q=q: q @ database.T},
                                   rounds=args.rounds, warmup=1)
            r = harness.ratio(legs["index"], legs["numpy"])
            print(f"B={batch}: index {legs['index'].median * 1e3:.1f} ms, numpy product "
                  f"{legs['numpy'].median * 1e3:.1f} ms, ratio {r}", flush=True)
            results["latency"][str(batch)] = {"index": legs["index"].summary(),
                                              "numpy": legs["numpy"].summary(),
                                              "index_over_numpy": r.summary()}
    results["machine_after"] = harness.machine()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
