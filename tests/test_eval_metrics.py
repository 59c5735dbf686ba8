"""Metrics of the revisited and original protocols: hand-computed cases and a cross-check
against an independent straightforward implementation (full argsort ranking, junk
removed, cirtorch compute_ap)."""

import numpy as np
import pytest

from glam_tf.eval import metrics
from glam_tf.eval.search import exact_search
from helpers import ref_compute_map


def _ref_revisited(scores, gnd):
    """scores (Q, N) -> {setup: (mAP, mP@k)} by the reference route."""
    ranking = np.argsort(-scores, axis=1, kind="stable").T
    out = {}
    for setup, pos_keys, junk_keys in (("easy", ["easy"], ["junk", "hard"]),
                                       ("medium", ["easy", "hard"], ["junk"]),
                                       ("hard", ["hard"], ["junk", "easy"])):
        g = [{"ok": np.concatenate([q[k] for k in pos_keys]),
              "junk": np.concatenate([q[k] for k in junk_keys])} for q in gnd]
        m, pr, _ = ref_compute_map(ranking, g)
        out[setup] = (100 * m, 100 * pr)
    return out


def _random_gnd(rng, nq, n):
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n)
        ne, nh, nj = rng.integers(0, 8, size=3)
        if q == 0:
            nh = 0  # a query without hard positives: left out of the Hard mean
        gnd.append({"easy": perm[:ne], "hard": perm[ne:ne + nh],
                    "junk": perm[ne + nh:ne + nh + nj], "bbx": None})
    gnd[1]["easy"] = gnd[1]["easy"][:0]  # and one without easy ones
    gnd[1]["hard"] = np.array([5, 6]) if n > 6 else gnd[1]["hard"]
    gnd[1]["junk"] = np.setdiff1d(gnd[1]["junk"], [5, 6])
    return gnd


def _ours(scores_q, db, gnd, **search_kw):
    tracked = [np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in gnd]
    res = exact_search(scores_q, db, k=10, tracked=tracked, **search_kw)
    return metrics.evaluate_setups(gnd, res.rank_of), res


# ---------------------------------------------------------------------------------------
# Hand-computed cases.

def test_average_precision_hand_computed():
    # positives at 0-based ranks 0 and 2, n = 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert metrics.average_precision([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # one of two positives never retrieved (n larger than the ranks given)
    assert metrics.average_precision([1], 2) == pytest.approx((0 + 0.5) / 2 / 2)
    assert metrics.average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_positives"):
        metrics.average_precision([0], 0)


def test_junk_removal_moves_positives_up():
    # raw ranks: junk 0 and 2, positives 1 and 3 -> after removal 0 and 1 -> AP 1
    np.testing.assert_array_equal(metrics.ranks_after_removal([3, 1], [2, 0]), [0, 1])
    ap, pr = metrics.query_metrics([1, 3], [0, 2])
    assert ap == pytest.approx(1.0)
    np.testing.assert_allclose(pr, [1.0, 1.0, 1.0])
    # without removal the same positives give a lower AP
    ap_raw, _ = metrics.query_metrics([1, 3], [])
    assert ap_raw == pytest.approx(((0 + 0.5) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


def test_precision_at_k_quirk():
    # all positives above k: the denominator shrinks to max(R)
    np.testing.assert_allclose(metrics.precision_at_k([0, 1]), [1.0, 1.0, 1.0])
    # 1-based ranks 3 and 7: P@1 = 0/1, P@5 = 1/5, P@10 = 2/min(7, 10)
    np.testing.assert_allclose(metrics.precision_at_k([2, 6]), [0.0, 0.2, 2 / 7])
    np.testing.assert_allclose(metrics.precision_at_k([11]), [0.0, 0.0, 0.0])


def test_setups_and_queries_without_positives():
    gnd = [{"easy": np.array([0]), "hard": np.array([1]), "junk": np.array([2])},
           {"easy": np.array([3]), "hard": np.zeros(0, int), "junk": np.zeros(0, int)}]
    pos, ign = metrics.setup_ground_truth(gnd[0], "easy")
    np.testing.assert_array_equal(pos, [0])
    np.testing.assert_array_equal(ign, [1, 2])
    pos, ign = metrics.setup_ground_truth(gnd[0], "hard")
    np.testing.assert_array_equal(pos, [1])
    np.testing.assert_array_equal(ign, [0, 2])
    # ranking by index: 0, 1, 2, 3
    res = metrics.evaluate_setups(gnd, lambda q, idx: np.asarray(idx))
    # Hard: only query 0 has positives; its hard image 1 is first once easy 0 is deleted.
    assert res["hard"]["num_evaluated"] == 1
    assert res["hard"]["mAP"] == pytest.approx(100.0)
    assert res["hard"]["ap"] == [pytest.approx(1.0), None]
    # Easy: query 0 -> AP 1; query 1 positive 3 with ignored none -> rank 3 -> 1/4 * 1/2
    assert res["easy"]["ap"][1] == pytest.approx((0 + 1 / 4) / 2)
    assert res["easy"]["mAP"] == pytest.approx(100 * (1 + 1 / 8) / 2)
    assert res["medium"]["mP@5"] == pytest.approx(100 * (1.0 + 1 / 4) / 2)
    excluded = metrics.evaluate_setups(gnd, lambda q, idx: np.asarray(idx),
                                       excluded_queries=[0])
    assert excluded["hard"]["num_evaluated"] == 0 and np.isnan(excluded["hard"]["mAP"])
    with pytest.raises(ValueError, match="setup"):
        metrics.setup_ground_truth(gnd[0], "extreme")


def test_ties_are_broken_by_index():
    # scores 0.5, 0.9, 0.5, 0.5: a stable sort ranks the database 1, 0, 2, 3
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    db = np.array([[0.5, 0], [0.9, 0], [0.5, 0], [0.5, 0]], dtype=np.float32)
    res = exact_search(q, db, k=4, tracked=[[0, 2, 3]])
    np.testing.assert_array_equal(res.rank_of(0, [0, 2, 3]), [1, 2, 3])
    np.testing.assert_array_equal(res.topk_indices[0], [1, 0, 2, 3])
    gnd = [{"easy": np.array([3]), "hard": np.zeros(0, int), "junk": np.array([0])}]
    out = metrics.evaluate_setups(gnd, res.rank_of, setups=("original",))
    assert out["original"]["ap"][0] == pytest.approx((0 + 1 / 3) / 2)  # rank 3 - 1 junk


# ---------------------------------------------------------------------------------------
# Cross-check against the reference on random data.

def test_matches_reference_with_ties_integer_scores():
    # integer-valued descriptors: every product is exact whatever the summation order, and
    # ties are everywhere
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, size=(12, 8)).astype(np.float32)
    db = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)
    gnd = _random_gnd(rng, 12, 300)
    ours, _ = _ours(q, db, gnd, chunk_size=37)
    ref = _ref_revisited(q @ db.T, gnd)
    for setup in metrics.SETUPS:
        assert ours[setup]["mAP"] == pytest.approx(ref[setup][0], abs=1e-9)
        np.testing.assert_allclose([ours[setup][f"mP@{k}"] for k in (1, 5, 10)],
                                   ref[setup][1], atol=1e-9)
    assert ours["hard"]["num_evaluated"] == sum(len(g["hard"]) > 0 for g in gnd) < 12
    assert ours["easy"]["num_evaluated"] == sum(len(g["easy"]) > 0 for g in gnd) < 12


def test_matches_reference_float_descriptors_single_chunk():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((20, 32)).astype(np.float32)
    db = rng.standard_normal((2000, 32)).astype(np.float32)
    gnd = _random_gnd(rng, 20, 2000)
    ours, res = _ours(q, db, gnd, chunk_size=2000)
    ref = _ref_revisited(q @ db.T, gnd)
    for setup in metrics.SETUPS:
        assert ours[setup]["mAP"] == pytest.approx(ref[setup][0], abs=1e-9)
    # the top-k is the head of the stable full ranking
    np.testing.assert_array_equal(res.topk_indices,
                                  np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :10])
