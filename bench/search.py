"""Benchmark: exact chunked search of 70 queries over N synthetic 512-d descriptors.

Reports seconds and peak memory of `glam_tf.eval.search.exact_search` (top-100 plus the
whole-database ranks of ~300 tracked images per query, as ROxf+1M's AP needs):
tracemalloc's peak of the search's own allocations, the descriptor matrix's size, and the
process's max RSS before/after; and its time as a ratio to the bare product
`queries @ database.T` (the compute floor) measured in the same run, best of `--rounds`
each, alternated so that a busy machine slows both. Optionally an approximate faiss index
and its recall.

  .venv/bin/python bench/search.py                       # 1M x 512 (2 GB of descriptors)
  .venv/bin/python bench/search.py --num_db=100000 --approx_index=HNSW32
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
from glam_tf.eval import search  # pylint: disable=wrong-import-position


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
                   help="descriptors drawn around this many centres (0: uniform on the sphere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (best is reported)")
    p.add_argument("--tracked", choices=("random", "nearest"), default="random",
                   help="random: the tracked images are any of the first 5000 (most score "
                   "like distractors: every chunk row is sorted whole, the worst case); "
                   "nearest: the 5000's most similar to the query, as real positives mostly "
                   "are (only the rows' upper tails are sorted)")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    centers = _unit_rows(rng, args.num_clusters, args.dim) if args.num_clusters else None
    db = _unit_rows(rng, args.num_db, args.dim, centers=centers)
    queries = _unit_rows(rng, args.num_queries, args.dim, centers=centers)
    # queries near some database rows, so the tracked positives rank high
    tracked = [rng.choice(min(args.num_db, 5000), args.num_tracked, replace=False)
               for _ in range(args.num_queries)]
    queries += 0.5 * db[[t[0] for t in tracked]]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    if args.tracked == "nearest":
        head = queries @ db[:min(args.num_db, 5000)].T
        tracked = list(np.argsort(-head, axis=1)[:, :args.num_tracked])
    gen_s = time.time() - t0
    rss_before = _maxrss_mb()

    tracemalloc.start()
    t0 = time.time()
    res = search.exact_search(queries, db, k=args.k, tracked=tracked,
                              memory_budget_bytes=(args.memory_budget_mb << 20) or None)
    seconds = time.time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = _maxrss_mb()

    product_s = []
    for _ in range(args.rounds):
        t0 = time.time()
        product = queries @ db.T
        product_s.append(time.time() - t0)
        del product
        t0 = time.time()
        search.exact_search(queries, db, k=args.k, tracked=tracked,
                            memory_budget_bytes=(args.memory_budget_mb << 20) or None)
        seconds = min(seconds, time.time() - t0)
    product_s = min(product_s)

    # spot check one query against a full argsort of the same chunk products
    q = 0
    c = res.chunk_size
    scores = np.concatenate([(queries[:res.query_block] @ db[a:a + c].T)[q]
                             for a in range(0, args.num_db, c)])
    order = np.argsort(-scores, kind="stable")
    full_ranks = np.empty_like(order)
    full_ranks[order] = np.arange(order.size)
    spot_ok = bool(np.array_equal(res.rank_of(q, tracked[q]), full_ranks[tracked[q]])
                   and np.array_equal(res.topk_indices[q], order[:args.k]))

    out = {
        "num_db": args.num_db, "num_queries": args.num_queries, "dim": args.dim, "k": args.k,
        "tracked_per_query": args.num_tracked, "generate_s": round(gen_s, 2),
        "search_s": round(seconds, 3), "bare_product_s": round(product_s, 3),
        "search_over_product": round(seconds / product_s, 3), "chunk_size": res.chunk_size,
        "query_block": res.query_block, "descriptor_mb": round(db.nbytes / 2**20, 1),
        "search_peak_tracemalloc_mb": round(peak / 2**20, 1),
        "peak_over_descriptors": round((db.nbytes + peak) / db.nbytes, 3),
        "maxrss_before_mb": round(rss_before, 1), "maxrss_after_mb": round(rss_after, 1),
        "maxrss_delta_mb": round(rss_after - rss_before, 1), "spot_check_ok": spot_ok,
    }
    if args.approx_index:
        idx, _, build_s, search_s = search.approximate_search(
            queries, db, k=args.k, index_spec=args.approx_index, params=args.approx_params)
        out.update(approx_index=args.approx_index, approx_params=args.approx_params,
                   approx_build_s=round(build_s, 2),
                   approx_search_s=round(search_s, 4),
                   approx_recall_at_k=round(search.recall_at_k(idx, res.topk_indices, args.k), 4))
    print(f"exact search: {args.num_queries} queries x {args.num_db} x {args.dim}: "
          f"{seconds:.2f} s = {seconds / product_s:.2f}x the bare product queries @ db.T "
          f"({product_s:.2f} s, same run); peak search allocations {peak / 2**20:.0f} MiB "
          f"on top of {db.nbytes / 2**20:.0f} MiB of descriptors (total {out['peak_over_descriptors']}x "
          f"the descriptor matrix); max RSS +{rss_after - rss_before:.0f} MiB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
