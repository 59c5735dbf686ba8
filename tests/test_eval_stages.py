"""The evaluator's stages after extraction, each called alone on made-up descriptors:
search_features, refine_ranking, score_ranking and results_record against a NumPy
reference of the ranking and of the revisited protocol's AP."""

import numpy as np
import pytest

from glam_tf.config import EvalConfig, RefineConfig
from glam_tf.data.testsets import TestSet
from glam_tf.eval import evaluator

NUM_DB, NUM_Q, DIM = 60, 4, 16


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    db = _unit(rng.normal(size=(NUM_DB, DIM)))
    queries = _unit(db[[3, 17, 30, 44]] + 0.6 * rng.normal(size=(NUM_Q, DIM)))
    gnd = [{"bbx": None, "easy": np.array([3, 4]), "hard": np.array([5]),
            "junk": np.array([6])},
           {"bbx": None, "easy": np.array([17]), "hard": np.array([], np.int64),
            "junk": np.array([], np.int64)},
           {"bbx": None, "easy": np.array([30, 31, 32]), "hard": np.array([33]),
            "junk": np.array([34, 35])},
           {"bbx": None, "easy": np.array([44]), "hard": np.array([45, 46]),
            "junk": np.array([], np.int64)}]
    ts = TestSet(name="synth", image_dir="img", imlist=[f"d{i}" for i in range(NUM_DB)],
                 qimlist=[f"q{i}" for i in range(NUM_Q)], gnd=gnd, query_dir="img")
    valid = np.ones(NUM_DB, bool)
    valid[5] = False   # an undecodable positive: ranks last, still counts
    features = evaluator.Features(
        queries=queries, database=db, database_valid=valid, bad_queries=[],
        undecodable=[], enlarged=[],
        manifest={"max_image_size": 64, "settings": {"model": {"kind": "test"},
                                                     "scales": [1.0]}})
    return ts, features


def _reference_ap(scores, valid, gnd, setup):
    """AP of one query from a full stable sort (cirtorch's compute_ap, junk deleted)."""
    order = np.lexsort((np.arange(len(scores)), -np.where(valid, scores, -np.inf)))
    easy, hard, junk = gnd["easy"], gnd["hard"], gnd["junk"]
    pos, ign = {"easy": (easy, np.concatenate([junk, hard])),
                "medium": (np.concatenate([easy, hard]), junk),
                "hard": (hard, np.concatenate([junk, easy]))}[setup]
    if len(pos) == 0:
        return None
    kept = [i for i in order if i not in set(ign.tolist())]
    ranks = sorted(kept.index(i) for i in pos)
    ap = 0.0
    for j, r in enumerate(ranks):
        p0 = 1.0 if r == 0 else j / r
        ap += (p0 + (j + 1) / (r + 1)) / 2
    return ap / len(pos)


def test_stages_alone_match_a_numpy_reference(case):
    ts, features = case
    cfg = EvalConfig(dataset="synth", data_root="d", output_dir="o", topk=5)
    tracked = evaluator.tracked_images(ts)
    ranking = evaluator.search_features(features, tracked, cfg)
    assert ranking.final is ranking.exact and ranking.k == 10   # at least the pictures' 10
    scores_all = features.queries @ features.database.T
    for q in range(NUM_Q):
        masked = np.where(features.database_valid, scores_all[q], -np.inf)
        want = np.lexsort((np.arange(NUM_DB), -masked))[:ranking.k]
        np.testing.assert_array_equal(ranking.exact.topk_indices[q], want)
    # no refinement configured: the ranking goes through unchanged
    assert evaluator.refine_ranking(features, tracked, cfg.refine, ranking) is ranking
    scores = evaluator.score_ranking(ts, features, ranking)
    assert scores.setups == ("easy", "medium", "hard") and scores.without_refinement is None
    for setup in scores.setups:
        for q in range(NUM_Q):
            want = _reference_ap(scores_all[q], features.database_valid, ts.gnd[q], setup)
            got = scores.final[setup]["ap"][q]
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, abs=1e-9)
    record = evaluator.results_record(cfg, ts, features, ranking, scores, extraction={})
    medium = np.mean([_reference_ap(scores_all[q], features.database_valid, ts.gnd[q],
                                    "medium") for q in range(NUM_Q)])
    assert record["metrics"]["medium"]["mAP"] == pytest.approx(100 * medium, abs=0.006)
    assert record["counts"]["undecodable_database"] == 1
    assert [len(p["top"]) for p in record["per_query"]] == [5] * NUM_Q
    assert "refinement" not in record


def test_refine_stage_keeps_the_exact_ranking_and_scores_both(case):
    ts, features = case
    cfg = EvalConfig(dataset="synth", data_root="d", output_dir="o",
                     refine=RefineConfig(query_expansion=True, qe_neighbors=2))
    tracked = evaluator.tracked_images(ts)
    exact = evaluator.search_features(features, tracked, cfg)
    refined = evaluator.refine_ranking(features, tracked, cfg.refine, exact)
    assert refined.exact is exact.exact and refined.final is not exact.exact
    assert set(refined.refine_seconds) >= {"query_expansion"}
    scores = evaluator.score_ranking(ts, features, refined)
    plain = evaluator.score_ranking(ts, features, exact)
    assert scores.without_refinement["medium"]["mAP"] == plain.final["medium"]["mAP"]
    record = evaluator.results_record(cfg, ts, features, refined, scores, extraction={})
    assert record["refinement"]["ran"] == list(cfg.refine.enabled)
    assert all("ap_without_refinement" in p for p in record["per_query"])
