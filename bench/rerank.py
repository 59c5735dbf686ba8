"""Benchmark: time per query of the search-time refinements, and alpha-DBA's time and memory.

- re-ranking (SuperGlobal, `glam_tf.eval.refine.rerank_search_result`) of each query's top
  --rerank_m among --num_db synthetic 512-d descriptors: ms per query (best of --rounds;
  goal: under 10 ms at M = 400);
- alpha-QE: the expansion plus the second exact search, ms per query;
- alpha-DBA of a --dba_num_db database (exact_search in blocks): seconds, ms per database
  image, tracemalloc peak of its own temporaries and the output's size; with the quadratic
  extrapolation to --extrapolate_to images (the search of every image against every image
  grows as N^2, the memory as N).

  .venv/bin/python bench/rerank.py
  .venv/bin/python bench/rerank.py --dba_num_db=1000000      # the real 1M pass (hours)

Times are wall clock (best of --rounds) with the process CPU time next to them: on a shared
machine the CPU time is the steadier figure.
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
import harness  # noqa: E402  (this folder)  # pylint: disable=wrong-import-position
from glam_tf.eval import refine, search  # noqa: E402  # pylint: disable=wrong-import-position


def _unit_rows(rng, n, d, centers, chunk=10_000):
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), d), dtype=np.float32)
        x = 0.6 * x / np.sqrt(d) + centers[rng.integers(0, len(centers), len(x))]
        out[a:a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _best(fn, rounds):
    """(best wall seconds, the process CPU seconds of that round, the last output)."""
    times, out = [], None
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(times)
    return wall, cpu, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_db", type=int, default=100_000)
    p.add_argument("--num_queries", type=int, default=70)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rerank_m", type=int, default=400)
    p.add_argument("--rerank_k", type=int, default=9)
    p.add_argument("--rerank_beta", type=float, default=0.15)
    p.add_argument("--qe_neighbors", type=int, default=2)
    p.add_argument("--dba_num_db", type=int, default=20_000)
    p.add_argument("--dba_neighbors", type=int, default=2)
    p.add_argument("--extrapolate_to", type=int, default=1_000_000)
    p.add_argument("--num_clusters", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.num_clusters, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    db = _unit_rows(rng, args.num_db, args.dim, centers)
    q = _unit_rows(rng, args.num_queries, args.dim, centers)
    out = {"machine": harness.header(),
           "num_db": args.num_db, "num_queries": args.num_queries, "dim": args.dim,
           "cpus": os.cpu_count()}

    m = min(args.rerank_m, args.num_db)
    s_search, _, base = _best(lambda: search.exact_search(q, db, k=m), 1)
    out["exact_search_ms_per_query"] = round(1000 * s_search / args.num_queries, 3)
    s_rr, c_rr, _ = _best(lambda: refine.rerank_search_result(q, db, base, m=m, k=args.rerank_k,
                                                        beta=args.rerank_beta), args.rounds)
    out["rerank"] = {"m": m, "k": args.rerank_k, "beta": args.rerank_beta,
                     "ms_per_query": round(1000 * s_rr / args.num_queries, 3),
                     "cpu_ms_per_query": round(1000 * c_rr / args.num_queries, 3)}

    def qe():
        q2 = refine.query_expansion(q, db, base.topk_indices, base.topk_scores,
                                    n=args.qe_neighbors)
        return search.exact_search(q2, db, k=m)
    s_qe, _, _ = _best(qe, 1)
    out["query_expansion"] = {"n": args.qe_neighbors,
                              "ms_per_query": round(1000 * s_qe / args.num_queries, 3)}

    n = args.dba_num_db
    dba_db = db[:n] if n <= args.num_db else _unit_rows(rng, n, args.dim, centers)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    dest = np.empty_like(dba_db)
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    refine.database_augmentation(dba_db, k=args.dba_neighbors, out=dest)
    s_dba, c_dba = time.perf_counter() - t0, time.process_time() - c0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    scale = args.extrapolate_to / n
    out["database_augmentation"] = {
        "num_db": n, "k": args.dba_neighbors, "seconds": round(s_dba, 2),
        "cpu_seconds": round(c_dba, 2),
        "ms_per_database_image": round(1000 * s_dba / n, 4),
        "descriptors_mb": round(dba_db.nbytes / 2**20, 1),
        "output_mb": round(dest.nbytes / 2**20, 1),
        "temporaries_peak_mb": round(peak / 2**20, 1),
        "max_rss_mb_before": round(rss0, 1),
        "max_rss_mb_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "extrapolated_to": args.extrapolate_to,
        "extrapolated_hours": round(s_dba * scale**2 / 3600, 2),
        "extrapolated_cpu_hours": round(c_dba * scale**2 / 3600, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "extrapolated_descriptors_plus_output_gb": round(2 * dba_db.nbytes * scale / 2**30, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
