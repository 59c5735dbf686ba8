"""Benchmark: exact chunked search of 70 queries over N synthetic 512-d descriptors.

Reports, per case, the time of `glam_tf.eval.search.exact_search` (top-100 plus the
whole-database ranks of ~300 tracked images per query, as ROxf+1M's AP needs) as a ratio
to the bare product `queries @ database.T`, and to the same product into an output kept
from round to round (the compute floor: no fresh 280 MB to map and zero, whose cost varies
from round to round with the kernel's huge pages), all timed in the same run through
bench/harness.py (warmed up, order rotated, median of --rounds with the per-round
spread); its peak memory (tracemalloc's peak of the search's own allocations
against the descriptor matrix's size, and the process's max RSS); and a spot check of one
query against a full argsort. Optionally an approximate faiss index and its recall.

Cases (--cases, DATA:TRACKED): DATA clustered (around --num_clusters centres) or uniform
(on the sphere); TRACKED random (any of the first 5000 images), nearest (the 5000's most
similar to the query, as real positives mostly are) or whole (any of the whole database,
as hard positives can be: ranked deep in the list). The default runs the three that bound
the cost and prints their ratios on one line.

  .venv/bin/python bench/search.py                       # 1M x 512 (2 GB of descriptors)
  .venv/bin/python bench/search.py --tracked=whole       # clustered:whole,uniform:whole
  .venv/bin/python bench/search.py --num_db=100000 --cases=clustered:random \
      --approx_index=HNSW32
"""

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
import harness  # noqa: E402  (this folder)
from glam_tf.eval import search  # noqa: E402

DATA = ("clustered", "uniform")
TRACKED = ("random", "nearest", "whole")


def _unit_rows(rng, n, d, *, centers=None, chunk=10_000):
    """(n, d) float32 unit rows, generated in small chunks (so the generation's temporaries
    stay below the search's in max RSS); around random `centers` when given, so that an
    approximate index has neighbourhoods to find (random 512-d points have none)."""
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), d), dtype=np.float32)
        if centers is not None:
            x = 0.6 * x / np.sqrt(d) + centers[rng.integers(0, len(centers), len(x))]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:a + len(x)] = x
    return out


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cases(text):
    """[(data, tracked)] of --cases, or a one-line error naming the flag."""
    cases = []
    for item in text.split(","):
        data, _, tracked = item.strip().partition(":")
        if data not in DATA or tracked not in TRACKED:
            raise SystemExit(f"--cases: {item!r} is not DATA:TRACKED with DATA one of "
                             f"{', '.join(DATA)} and TRACKED one of {', '.join(TRACKED)}")
        cases.append((data, tracked))
    return cases


def _tracked(rng, queries, db, mode, num_tracked):
    """Per query the tracked images of `mode` (see the module docstring); the queries are
    moved toward their first tracked image, so that it ranks high, as a positive does."""
    n = len(db)
    pool = n if mode == "whole" else min(n, 5000)
    tracked = [rng.choice(pool, num_tracked, replace=False) for _ in range(len(queries))]
    queries = queries + 0.5 * db[[t[0] for t in tracked]]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    if mode == "nearest":
        head = queries @ db[:pool].T
        tracked = list(np.argsort(-head, axis=1)[:, :num_tracked])
    return queries, tracked


def _spot_check(queries, db, res, tracked, k):
    """Query 0's ranks and top-k against a full stable argsort of the same chunk products."""
    scores = np.concatenate([(queries[:res.query_block] @ db[a:b].T)[0]
                             for a, b in res.chunk_bounds])
    order = np.argsort(-scores, kind="stable")
    full_ranks = np.empty_like(order)
    full_ranks[order] = np.arange(order.size)
    return bool(np.array_equal(res.rank_of(0, tracked[0]), full_ranks[tracked[0]])
                and np.array_equal(res.topk_indices[0], order[:k]))


def _run_case(args, db, queries, tracked, budget):
    rss_before = _maxrss_mb()
    tracemalloc.start()
    res = search.exact_search(queries, db, k=args.k, tracked=tracked,
                              memory_budget_bytes=budget)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = _maxrss_mb()

    def product():
        del_me = queries @ db.T
        del del_me

    into = np.empty((len(queries), len(db)), dtype=np.float32)

    def product_into():
        np.matmul(queries, db.T, out=into)

    legs = harness.compare(
        {"search": lambda: search.exact_search(queries, db, k=args.k, tracked=tracked,
                                               memory_budget_bytes=budget),
         "product": product, "product_into": product_into}, rounds=args.rounds, warmup=1)
    del into
    r = harness.ratio(legs["search"], legs["product"])
    r_into = harness.ratio(legs["search"], legs["product_into"])
    deepest = max(int(res.tracked_ranks[q].max()) for q in range(len(queries))
                  if res.tracked_ranks[q].size)
    out = {"search": legs["search"].summary(), "product": legs["product"].summary(),
           "product_into": legs["product_into"].summary(),
           "search_over_product": r.summary(), "search_over_product_into": r_into.summary(),
           "deepest_tracked_rank": deepest,
           "chunk_size": res.chunk_size, "chunks": len(res.chunk_bounds),
           "query_block": res.query_block,
           "search_peak_tracemalloc_mb": round(peak / 2**20, 1),
           "peak_over_descriptors": round((db.nbytes + peak) / db.nbytes, 3),
           "maxrss_delta_mb": round(rss_after - rss_before, 1),
           "spot_check_ok": _spot_check(queries, db, res, tracked, args.k)}
    if args.approx_index:
        idx, _, build_s, search_s = search.approximate_search(
            queries, db, k=args.k, index_spec=args.approx_index, params=args.approx_params)
        out.update(approx_index=args.approx_index, approx_params=args.approx_params,
                   approx_build_s=round(build_s, 2), approx_search_s=round(search_s, 4),
                   approx_recall_at_k=round(search.recall_at_k(idx, res.topk_indices, args.k),
                                            4))
    return out, r, r_into


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_db", type=int, default=1_000_000)
    p.add_argument("--num_queries", type=int, default=70)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--num_tracked", type=int, default=300, help="positives+junk per query")
    p.add_argument("--memory_budget_mb", type=int, default=0, help="0 = automatic")
    p.add_argument("--approx_index", default="", help="faiss factory string, e.g. HNSW32")
    p.add_argument("--approx_params", default="", help="faiss parameters, e.g. nprobe=16")
    p.add_argument("--num_clusters", type=int, default=1000,
                   help="centres of the clustered data")
    p.add_argument("--cases", default="clustered:random,uniform:random,uniform:whole",
                   help="comma-separated DATA:TRACKED (module docstring)")
    p.add_argument("--tracked", default="",
                   help="comma-separated TRACKED modes on both kinds of data (replaces "
                        "--cases), e.g. whole")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    args = p.parse_args()
    if args.tracked:
        args.cases = ",".join(f"{d}:{t.strip()}" for d in DATA for t in args.tracked.split(","))
    cases = _cases(args.cases)
    if args.num_clusters < 1 and any(d == "clustered" for d, _ in cases):
        raise SystemExit("--num_clusters must be >= 1 for the clustered cases")
    budget = (args.memory_budget_mb << 20) or None
    print(harness.header(), flush=True)

    results, ratios = [], []
    for data in DATA:
        wanted = [t for d, t in cases if d == data]
        if not wanted:
            continue
        rng = np.random.default_rng(args.seed)
        t0 = time.time()
        centers = _unit_rows(rng, args.num_clusters, args.dim) if data == "clustered" else None
        db = _unit_rows(rng, args.num_db, args.dim, centers=centers)
        base_queries = _unit_rows(rng, args.num_queries, args.dim, centers=centers)
        gen_s = time.time() - t0
        for mode in wanted:
            queries, tracked = _tracked(rng, base_queries, db, mode, args.num_tracked)
            out, r, r_into = _run_case(args, db, queries, tracked, budget)
            out = {"data": data, "tracked": mode, "num_db": args.num_db,
                   "num_queries": args.num_queries, "dim": args.dim, "k": args.k,
                   "tracked_per_query": args.num_tracked, "generate_s": round(gen_s, 2),
                   **out}
            print(f"{data} data, tracked {mode}: search / bare product {r}, / product into "
                  f"a kept output {r_into} [{out['search']['median_s']:.2f} s vs "
                  f"{out['product']['median_s']:.2f} s and "
                  f"{out['product_into']['median_s']:.2f} s, median of {args.rounds}]; "
                  f"deepest tracked rank {out['deepest_tracked_rank']}; "
                  f"peak search allocations {out['search_peak_tracemalloc_mb']:.0f} MiB "
                  f"({out['peak_over_descriptors']}x the descriptor matrix); "
                  f"spot check {'ok' if out['spot_check_ok'] else 'FAILED'}", flush=True)
            print(json.dumps(out), flush=True)
            results.append(out)
            ratios.append(f"{data}:{mode} {r.value:.2f}x ({r_into.value:.2f}x)")
        del db
    print(f"search / bare product (/ product into a kept output) ({args.num_queries} x "
          f"{args.num_db} x {args.dim}): {', '.join(ratios)}; {harness.header()}")


if __name__ == "__main__":
    main()
