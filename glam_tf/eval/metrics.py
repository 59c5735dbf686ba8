"""Retrieval metrics of the revisited (Easy/Medium/Hard) and original Oxford/Paris protocols.

Pure NumPy, from the whole-database rank of each positive and ignored image (see
EVAL_PROTOCOL.md): ranks are 0-based positions in the ranking of the WHOLE database
(glam_tf.eval.search computes them from scores without storing the ranking). Deleting
the ignored images from the ranking shifts a positive up by the number of ignored
images ranked above it; AP is the trapezoid under the precision-recall curve
(cirtorch `compute_ap`), mP@k has the reference code's shrinking denominator.
"""

import numpy as np

SETUPS = ("easy", "medium", "hard")
ORIGINAL_SETUP = "original"
KAPPAS = (1, 5, 10)


def setup_ground_truth(gnd_query, setup):
    """Positives and ignored database indices of one query under a protocol setup.

    | setup | positives | ignored |
    | easy | easy | junk ∪ hard |   | medium | easy ∪ hard | junk |
    | hard | hard | junk ∪ easy |   | original | easy ∪ hard (= good ∪ ok) | junk |

    Returns:
        (positives, ignored): sorted unique int64 arrays.
    """
    easy, hard, junk = (np.asarray(gnd_query[k], dtype=np.int64) for k in ("easy", "hard", "junk"))
    if setup == "easy":
        pos, ign = easy, np.concatenate([junk, hard])
    elif setup in ("medium", ORIGINAL_SETUP):
        pos, ign = np.concatenate([easy, hard]), junk
    elif setup == "hard":
        pos, ign = hard, np.concatenate([junk, easy])
    else:
        raise ValueError(f"setup must be one of {SETUPS + (ORIGINAL_SETUP,)}, got {setup!r}")
    return np.unique(pos), np.unique(ign)


def ranks_after_removal(positive_ranks, ignored_ranks):
    """0-based ranks of the positives once the ignored images are deleted from the ranking.

    Args:
        positive_ranks: (P,) whole-database 0-based ranks of the positives.
        ignored_ranks: (J,) whole-database 0-based ranks of the ignored images.

    Returns:
        (P,) int64, sorted: each rank minus the number of ignored images ranked strictly
        above it (an image listed both as positive and ignored stays a positive, as in
        the reference code).
    """
    pos = np.sort(np.asarray(positive_ranks, dtype=np.int64))
    ign = np.sort(np.asarray(ignored_ranks, dtype=np.int64))
    return pos - np.searchsorted(ign, pos, side="left")


def average_precision(ranks, num_positives):
    """Trapezoid AP from sorted 0-based ranks of the positives (junk already removed).

    AP = Σ_j (p0_j + p1_j) / 2 / n, p0_j = 1 if r_j = 0 else j / r_j, p1_j = (j+1)/(r_j+1).

    Args:
        ranks: (P,) sorted 0-based ranks r_0 < r_1 < ... of the positives.
        num_positives: n, the number of positives of the query (> 0).
    """
    r = np.asarray(ranks, dtype=np.float64)
    if num_positives <= 0:
        raise ValueError(f"num_positives must be > 0, got {num_positives}")
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((p0 + p1) / 2.0) / num_positives)


def precision_at_k(ranks, kappas=KAPPAS):
    """mP@k terms of one query, with the reference code's quirk.

    With 1-based ranks R = ranks + 1, k_q = min(max(R), k) and P@k = |{R <= k_q}| / k_q:
    the denominator shrinks when every positive ranks above k.

    Args:
        ranks: (P,) sorted 0-based ranks of the positives after junk removal, P > 0.
    Returns:
        (len(kappas),) float64.
    """
    r1 = np.asarray(ranks, dtype=np.int64) + 1
    out = np.empty(len(kappas), dtype=np.float64)
    for i, k in enumerate(kappas):
        kq = min(int(r1.max()), int(k))
        out[i] = np.count_nonzero(r1 <= kq) / kq
    return out


def query_metrics(positive_ranks, ignored_ranks, kappas=KAPPAS):
    """AP and P@k of one query from whole-database ranks; NaNs when it has no positives."""
    positive_ranks = np.asarray(positive_ranks)
    if positive_ranks.size == 0:
        return float("nan"), np.full(len(kappas), np.nan)
    ranks = ranks_after_removal(positive_ranks, ignored_ranks)
    return average_precision(ranks, positive_ranks.size), precision_at_k(ranks, kappas)


def evaluate_setups(gnd, rank_lookup, *, setups=SETUPS, kappas=KAPPAS, excluded_queries=()):
    """mAP and mP@k over queries for each setup.

    Args:
        gnd: per query a dict with int index arrays `easy`, `hard`, `junk`.
        rank_lookup: callable (query index, database indices (M,)) -> (M,) 0-based
            whole-database ranks.
        setups: setup names (see `setup_ground_truth`).
        excluded_queries: query indices to leave out (e.g. undecodable queries).

    Returns:
        {setup: {"mAP": %, "mP@1": %, ..., "num_evaluated": int, "ap": [per-query AP or
        None]}}; queries without positives (or excluded) get None and are left out of
        the means, which divide by the number of evaluated queries (NaN if none).
    """
    excluded = set(int(q) for q in excluded_queries)
    out = {}
    for setup in setups:
        aps, prs = [], []
        per_query = []
        for q, g in enumerate(gnd):
            pos, ign = setup_ground_truth(g, setup)
            if q in excluded or pos.size == 0:
                per_query.append(None)
                continue
            ap, pr = query_metrics(rank_lookup(q, pos), rank_lookup(q, ign), kappas)
            aps.append(ap)
            prs.append(pr)
            per_query.append(ap)
        res = {"mAP": 100.0 * float(np.mean(aps)) if aps else float("nan")}
        mprs = np.mean(prs, axis=0) if prs else np.full(len(kappas), np.nan)
        for k, v in zip(kappas, mprs):
            res[f"mP@{k}"] = 100.0 * float(v)
        res["num_evaluated"] = len(aps)
        res["ap"] = per_query
        out[setup] = res
    return out
