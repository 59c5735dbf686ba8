"""Training-free search-time refinements of global descriptors (pure NumPy).

What a retrieval service calls, and what the evaluator runs (RefineConfig says which):
- `alpha_expand`: x' = normalise(x + sum_i max(s_i, 0)^alpha d_i) over neighbours d_i with
  similarities s_i (alpha-QE / alpha-DBA, Radenovic et al., TPAMI 2019, eq. 2 with the
  item itself at weight 1).
- `query_expansion`: alpha-QE of queries from their top-n neighbours (search again after).
- `database_augmentation`: alpha-DBA of every database descriptor from its top-k database
  neighbours (itself excluded), found with glam_tf.eval.search.exact_search in blocks, so
  memory stays bounded at 1M images; writes into `out` (a memory map works).
- `superglobal_rerank`: re-ranking of each query's top M with global descriptors only
  (Shao et al., ICCV 2023, "Global Features are All You Need for Image Retrieval and
  Reranking"), as the authors' released code computes it (modules/reranking/MDescAug.py
  and RerankwMDA.py of ShihaoShao-GH/SuperGlobal):
  (a) among the M, each descriptor's K+1 most similar (itself first, at weight 1; the
      other K at weight beta * similarity) are averaged with those weights, x~_j; the
      score of step (a) is a_j = q . x~_j;
  (b) the element-wise maximum of the K+1 best x~ by a (the code's `K + 1  # including
      oneself`) is the expansion vector v; the final score is (a_j + v . x~_j) / 2.
  Ties are broken by the exact search's order (stable sorts). Positions after M keep their
  order.
- `RerankedResult`: a SearchResult whose whole-database ranks follow the new top-M order
  (ranks inside the top M from the new order, after M from the exact search), so AP stays
  exact.
"""

import dataclasses
import time

import numpy as np

from glam_tf import cpu
from glam_tf.eval import search

_EPS = 1e-12


def l2_normalize(x, axis=-1):
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _EPS)


def alpha_expand(vectors, neighbours, similarities, alpha):
    """alpha-weighted expansion: normalise(x + sum_i max(s_i, 0)^alpha d_i).

    Args:
        vectors: (B, D) the items themselves (weight 1).
        neighbours: (B, n, D) their neighbours' descriptors.
        similarities: (B, n) the neighbours' similarities (-inf for none: weight 0).
        alpha: exponent >= 0.

    Returns:
        (B, D) float32 unit rows.
    """
    s = np.asarray(similarities, dtype=np.float32)
    w = np.where(np.isfinite(s), np.maximum(s, 0.0), 0.0) ** np.float32(alpha)
    w = np.where(np.isfinite(s), w, 0.0).astype(np.float32)
    out = np.asarray(vectors, dtype=np.float32) + np.einsum("bn,bnd->bd", w,
                                                            np.asarray(neighbours, np.float32))
    return l2_normalize(out)


def query_expansion(queries, database, topk_indices, topk_scores, *, n=2, alpha=3.0):
    """alpha-QE: each query from itself and its top-n database neighbours.

    Args:
        queries: (Q, D) unit descriptors; database: (N, D).
        topk_indices, topk_scores: (Q, >= n) the queries' exact top-k (best first).
        n: neighbours used; alpha: similarity exponent.

    Returns:
        (Q, D) float32 expanded unit queries (search them again).
    """
    n = min(int(n), topk_indices.shape[1])
    idx = np.asarray(topk_indices)[:, :n]
    return alpha_expand(queries, np.asarray(database)[idx], np.asarray(topk_scores)[:, :n],
                        alpha)


def database_augmentation(database, *, k=2, alpha=3.0, valid=None, out=None,
                          block_rows=16384, memory_budget_bytes=None, log_every_s=30.0):
    """alpha-DBA: each database descriptor from itself and its top-k database neighbours.

    The neighbours come from exact_search of database blocks against the whole database
    (bounded temporaries: a block's top-(k+1) plus the search's budget). Invalid rows are
    neither neighbours nor changed.

    Args:
        database: (N, D) unit descriptors (a memory map works).
        k: neighbours per descriptor, itself excluded; alpha: similarity exponent.
        valid: (N,) bool or None.
        out: (N, D) float32 array to write to (default: a new one); not `database`.
        block_rows: database rows searched at a time.
        memory_budget_bytes: the search's temporaries (default 256 MiB: the self-search
            has many queries, and a small budget makes thin, slow matrix products).

    Returns:
        `out`.
    """
    n = database.shape[0]
    if out is None:
        out = np.empty(database.shape, dtype=np.float32)
    if out is database:
        raise ValueError("database_augmentation: `out` must not be `database` (the "
                         "neighbours are read from it while rows are written)")
    kk = min(int(k) + 1, n)
    budget = memory_budget_bytes or (256 << 20)
    valid_arr = None if valid is None else np.asarray(valid, dtype=bool)
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        block = np.asarray(database[a:b], dtype=np.float32)
        res = search.exact_search(block, database, k=kk, valid=valid_arr,
                                  memory_budget_bytes=budget,
                                  log_every_s=log_every_s)
        idx, sc = res.topk_indices, res.topk_scores.copy()
        # itself excluded (usually first; a duplicate may precede it): drop it, else the last
        own = idx == np.arange(a, b)[:, None]
        drop = np.where(own.any(axis=1), own.argmax(axis=1), kk - 1)
        keep = np.ones(idx.shape, dtype=bool)
        keep[np.arange(b - a), drop] = False
        idx = idx[keep].reshape(b - a, kk - 1)
        sc = sc[keep].reshape(b - a, kk - 1)
        refined = alpha_expand(block, np.asarray(database)[idx], sc, alpha)
        if valid_arr is not None:
            refined[~valid_arr[a:b]] = block[~valid_arr[a:b]]
        out[a:b] = refined
    return out


def _stable_topk_order(scores, k):
    """(R, k) column indices of each row's k best, by score desc then index asc, sorted."""
    part, part_scores = search._topk_of_chunk(scores, k, 0)  # pylint: disable=protected-access
    order = np.lexsort((part, -part_scores), axis=-1)
    return np.take_along_axis(part, order, axis=-1), np.take_along_axis(part_scores, order,
                                                                       axis=-1)


def _stable_argsort_desc(scores):
    """Row-wise order by score desc, ties by position (a stable sort)."""
    return np.argsort(-scores, axis=-1, kind="stable")


def superglobal_rerank(queries, top_descriptors, *, k=9, beta=0.15):
    """SuperGlobal re-ranking of a batch of queries' top M (see the module docstring).

    Args:
        queries: (B, D) query descriptors (as searched).
        top_descriptors: (B, M, D) database descriptors of each query's top M, in the exact
            search's order.
        k: K (neighbours among the M; K+1 descriptors form the expansion vector).
        beta: weight factor of the neighbours' similarities.

    Returns:
        (order (B, M) int64: the new order as positions in the given top M,
         scores (B, M) float32: the final scores in the new order).
    """
    x = np.asarray(top_descriptors, dtype=np.float32)
    bsz, m, dim = x.shape
    kk = min(int(k) + 1, m)
    q = np.asarray(queries, dtype=np.float32)
    # (a) top-M descriptor augmentation (MDescAug)
    # (B, M, M); one BLAS product per query (a batched matmul of a transposed view is not)
    gram = np.stack([xi @ xi.T for xi in x])
    nb, nb_sim = _stable_topk_order(gram.reshape(bsz * m, m), kk)
    nb, nb_sim = nb.reshape(bsz, m, kk), nb_sim.reshape(bsz, m, kk)
    w = nb_sim * np.float32(beta)
    w[:, :, 0] = 1.0                                              # the first is itself
    w /= w.sum(axis=2, keepdims=True)
    batch = np.arange(bsz)[:, None]
    refined = np.zeros_like(x)                                    # (B, M, D)
    for j in range(kk):   # one neighbour rank at a time: (B, M, D) gathers stay small
        refined += w[:, :, j, None] * x[batch, nb[:, :, j]]
    score_a = np.matmul(refined, q[:, :, None])[:, :, 0]
    pre = _stable_argsort_desc(score_a)
    # (b) re-ranking with the maximum of the K+1 best refined descriptors (RerankwMDA)
    refined_pre = refined[batch, pre]
    score_pre = np.take_along_axis(score_a, pre, axis=1)
    expansion = refined_pre[:, :kk].max(axis=1)                    # (B, D)
    final = (score_pre + np.matmul(refined_pre, expansion[:, :, None])[:, :, 0]) / 2.0
    post = _stable_argsort_desc(final)
    order = np.take_along_axis(pre, post, axis=1)
    return order.astype(np.int64), np.take_along_axis(final, post, axis=1).astype(np.float32)


@dataclasses.dataclass
class RerankedResult:
    """A SearchResult whose top M per query is re-ordered (ranks stay whole-database exact).

    Attributes:
        base: the exact SearchResult (its top-k holds at least the M).
        order: (Q, k) positions into base.topk_indices: the new order of the first m_q
            positions, the identity after.
        counts: (Q,) m_q, the re-ordered prefix length per query.
        topk_indices, topk_scores: (Q, k) the refined ranking's top-k (scores: the
            re-ranking's inside the first m_q, the exact search's after).
    """

    base: object
    order: np.ndarray
    counts: np.ndarray
    topk_indices: np.ndarray
    topk_scores: np.ndarray

    def rank_of(self, query, indices):
        """0-based ranks of `indices` in the refined ranking of the whole database."""
        r = self.base.rank_of(query, indices)
        m = int(self.counts[query])
        inside = r < m
        if np.any(inside):
            inverse = np.empty(m, dtype=np.int64)
            inverse[self.order[query, :m]] = np.arange(m)
            r = r.copy()
            r[inside] = inverse[r[inside]]
        return r


def rerank_search_result(queries, database, result, *, m=400, k=9, beta=0.15,
                         query_block=2):
    """Re-ranks the top m of every query of an exact `result` (SuperGlobal).

    Only the finite-scored prefix of a query's top m is re-ordered (invalid database
    images score -inf and stay last).

    Args:
        queries: (Q, D) the queries as searched; database: (N, D) as searched.
        result: a search.SearchResult with topk of at least min(m, N) columns.
        m, k, beta: see `superglobal_rerank`.
        query_block: queries re-ranked at a time (temporaries ~ block * m * (m + 11 D)).

    Returns:
        (RerankedResult, seconds of re-ranking).
    """
    t0 = time.perf_counter()
    nq, kk = result.topk_indices.shape
    m = min(int(m), database.shape[0])
    if kk < m:
        raise ValueError(f"rerank: the search kept top-{kk}, fewer than rerank_m={m}; "
                         "search with k >= rerank_m")
    counts = np.minimum(np.isfinite(result.topk_scores[:, :m]).sum(axis=1), m)
    order = np.tile(np.arange(kk, dtype=np.int64), (nq, 1))
    new_scores = result.topk_scores.copy()
    full = np.flatnonzero(counts == m)
    groups = [(full, m)] + [(np.array([q]), int(counts[q])) for q in np.flatnonzero(counts < m)
                            if counts[q] >= 2]

    def run(qs, mq):
        top = result.topk_indices[qs, :mq]
        o, sc = superglobal_rerank(queries[qs], np.asarray(database)[top], k=k, beta=beta)
        order[qs, :mq] = o
        new_scores[qs, :mq] = sc

    jobs = [(rows[s:s + query_block], mq) for rows, mq in groups
            for s in range(0, rows.size, query_block)]
    with cpu.single_threaded_blas():  # one BLAS thread per query block, blocks in threads
        pool = search._row_pool()  # pylint: disable=protected-access
        for future in [pool.submit(run, qs, mq) for qs, mq in jobs]:
            future.result()
    counts = np.where(counts >= 2, counts, 0)
    topk_indices = np.take_along_axis(result.topk_indices, order, axis=1)
    return (RerankedResult(base=result, order=order, counts=counts, topk_indices=topk_indices,
                           topk_scores=new_scores), time.perf_counter() - t0)


def refine_and_search(queries, database, config, *, tracked=None, valid=None, k=100,
                      memory_budget_bytes=None, log_every_s=30.0, base=None):
    """Runs the refinements `config` (a RefineConfig) enables, in order DBA -> QE -> rerank.

    Args:
        queries: (Q, D); database: (N, D) unit descriptors.
        tracked, valid, k, memory_budget_bytes, log_every_s: as search.exact_search.
        base: the exact SearchResult of `queries` on `database` (reused when DBA is off).

    Returns:
        (result with rank_of / topk_indices / topk_scores, {refinement: seconds}).
    """
    seconds = {}
    db = database
    need_k = max(k, config.rerank_m if config.rerank else 0,
                 config.qe_neighbors if config.query_expansion else 0)
    run = lambda q, d: search.exact_search(  # noqa: E731
        q, d, k=need_k, tracked=tracked, valid=valid, memory_budget_bytes=memory_budget_bytes,
        log_every_s=log_every_s)
    if config.database_augmentation:
        t0 = time.perf_counter()
        db = database_augmentation(database, k=config.dba_neighbors, alpha=config.dba_alpha,
                                   valid=valid, memory_budget_bytes=memory_budget_bytes,
                                   log_every_s=log_every_s)
        seconds["database_augmentation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = run(queries, db)
        seconds["search_augmented_database"] = time.perf_counter() - t0
    elif base is not None and base.topk_indices.shape[1] >= min(need_k, database.shape[0]):
        res = base
    else:
        res = run(queries, db)
    q = queries
    if config.query_expansion:
        t0 = time.perf_counter()
        q = query_expansion(queries, db, res.topk_indices, res.topk_scores,
                            n=config.qe_neighbors, alpha=config.qe_alpha)
        res = run(q, db)
        seconds["query_expansion"] = time.perf_counter() - t0
    if config.rerank:
        res, seconds["rerank"] = rerank_search_result(q, db, res, m=config.rerank_m,
                                                      k=config.rerank_k,
                                                      beta=config.rerank_beta)
    return res, seconds
