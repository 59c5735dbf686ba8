"""Search-time refinements (glam_tf.eval.refine), each against an independent NumPy reference
written here: alpha-QE, alpha-DBA, SuperGlobal re-ranking, the exactness of ranks and AP
after re-ranking (a brute-force full ranking scored by ref_compute_map), and the eval_main
flags, their record in the results JSON, and default-off results left identical."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from glam_tf.config import EvalConfig, RefineConfig, SettingError
from glam_tf.eval import evaluator, metrics, refine, search
from helpers import MAX_SIZE, SCALES, fake_backend, ref_compute_map, write_tiny_revisited

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clustered(rng, n, d, centers=6, spread=0.5):
    c = rng.standard_normal((centers, d))
    return _unit(c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))
                 ).astype(np.float32)


# ------------------------------------------------------------------ NumPy references

def ref_order(scores):
    """Descending, ties by index (a stable sort)."""
    return np.argsort(-np.asarray(scores), kind="stable")


def ref_alpha_qe(q, db, n, alpha):
    out = []
    for qi in q:
        s = db @ qi
        top = ref_order(s)[:n]
        v = qi.astype(np.float64).copy()
        for j in top:
            v += max(float(s[j]), 0.0) ** alpha * db[j]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def ref_alpha_dba(db, k, alpha, valid=None):
    s = db @ db.T
    if valid is not None:
        s[:, ~valid] = -np.inf
    out = db.astype(np.float64).copy()
    for i in range(len(db)):
        if valid is not None and not valid[i]:
            continue
        others = [j for j in ref_order(s[i]) if j != i][:k]
        v = db[i].astype(np.float64).copy()
        for j in others:
            v += max(float(s[i, j]), 0.0) ** alpha * db[j]
        out[i] = v / np.linalg.norm(v)
    return out


def ref_superglobal(q, top_x, k, beta):
    """The authors' MDescAug + RerankwMDA for one query, loop by loop: new order of the M."""
    m = len(top_x)
    kk = min(k + 1, m)
    refined = np.zeros_like(top_x, dtype=np.float64)
    for j in range(m):
        sims = np.array([float(np.dot(top_x[j], top_x[i])) for i in range(m)])
        nbrs = ref_order(sims)[:kk]
        weights = [1.0] + [beta * sims[i] for i in nbrs[1:]]
        refined[j] = sum(w * top_x[i] for w, i in zip(weights, nbrs)) / sum(weights)
    score_a = refined @ q
    pre = ref_order(score_a)
    expansion = refined[pre[:kk]].max(axis=0)
    final = [(score_a[j] + float(np.dot(expansion, refined[j]))) / 2.0 for j in pre]
    return pre[ref_order(final)]


# ------------------------------------------------------------------ the refinements

def test_alpha_query_expansion_matches_reference():
    rng = np.random.default_rng(0)
    db, q = _clustered(rng, 60, 16), _clustered(rng, 7, 16)
    res = search.exact_search(q, db, k=5)
    got = refine.query_expansion(q, db, res.topk_indices, res.topk_scores, n=3, alpha=3.0)
    np.testing.assert_allclose(got, ref_alpha_qe(q, db, 3, 3.0), atol=1e-5)


@pytest.mark.parametrize("block_rows", [7, 1000])
def test_alpha_dba_matches_reference_in_blocks_and_skips_invalid(block_rows):
    rng = np.random.default_rng(1)
    db = _clustered(rng, 50, 12)
    db[10] = db[11]                                   # a duplicate: itself is still excluded
    valid = np.ones(50, dtype=bool)
    valid[[3, 40]] = False
    got = refine.database_augmentation(db, k=2, alpha=3.0, valid=valid, block_rows=block_rows,
                                       memory_budget_bytes=4096)
    want = ref_alpha_dba(db, 2, 3.0, valid)
    # rows 10/11 are duplicates: "itself" may be either, same vector, same result
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got[~valid], db[~valid])
    with pytest.raises(ValueError, match="must not be `database`"):
        refine.database_augmentation(db, out=db)


@pytest.mark.parametrize("m,k,beta", [(40, 9, 0.15), (25, 3, 0.5), (12, 20, 0.15)])
def test_superglobal_rerank_matches_reference(m, k, beta):
    rng = np.random.default_rng(2)
    q = _clustered(rng, 5, 24)
    tops = np.stack([_clustered(rng, m, 24, centers=4) for _ in range(5)])
    order, scores = refine.superglobal_rerank(q, tops, k=k, beta=beta)
    for b in range(5):
        np.testing.assert_array_equal(order[b], ref_superglobal(q[b], tops[b], k, beta))
        assert sorted(order[b].tolist()) == list(range(m))
        assert np.all(np.diff(scores[b]) <= 1e-7)


def _gnd(rng, nq, n):
    gnd = []
    for _ in range(nq):
        perm = rng.permutation(n)
        gnd.append({"easy": perm[:6], "hard": perm[6:9], "junk": perm[9:12]})
    return gnd


def _ref_map(ranking, gnd, setup):
    g = []
    for x in gnd:
        pos, ign = metrics.setup_ground_truth(x, setup)
        g.append({"ok": pos, "junk": ign})
    return ref_compute_map(ranking, g)


@pytest.mark.parametrize("m", [30, 500])
def test_rerank_ranks_and_ap_are_exact(m):
    """Brute force: the full stable ranking, its first M re-ordered by the reference; AP by
    ref_compute_map on it equals AP from RerankedResult.rank_of (whole-database ranks)."""
    rng = np.random.default_rng(4)
    n, nq = 120, 6
    db, q = _clustered(rng, n, 16, centers=5), _clustered(rng, nq, 16, centers=5)
    valid = np.ones(n, dtype=bool)
    valid[[5, 77]] = False                            # rank last, never re-ranked
    gnd = _gnd(rng, nq, n)
    tracked = [np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in gnd]
    base = search.exact_search(q, db, k=min(m, n), tracked=tracked, valid=valid,
                               chunk_size=17)
    res, _ = refine.rerank_search_result(q, db, base, m=m, k=5, beta=0.15)
    scores = np.where(valid[None], q @ db.T, -np.inf)
    ranking = []
    for i in range(nq):
        full = ref_order(scores[i])
        mq = min(m, int(np.isfinite(scores[i]).sum()))
        full[:mq] = full[:mq][ref_superglobal(q[i], db[full[:mq]], 5, 0.15)]
        ranking.append(full)
        np.testing.assert_array_equal(res.topk_indices[i, :min(m, n)], full[:min(m, n)])
        for t in tracked[i]:
            assert res.rank_of(i, [t])[0] == int(np.flatnonzero(full == t)[0])
    ranking = np.array(ranking).T
    got = metrics.evaluate_setups(gnd, res.rank_of)
    for setup in metrics.SETUPS:
        ref_map, ref_pr, _ = _ref_map(ranking, gnd, setup)
        assert got[setup]["mAP"] == pytest.approx(100 * ref_map, abs=1e-9)
        assert got[setup]["mP@10"] == pytest.approx(100 * ref_pr[2], abs=1e-9)


def test_all_refinements_together_match_the_composed_reference():
    rng = np.random.default_rng(5)
    n, nq = 90, 5
    db, q = _clustered(rng, n, 16), _clustered(rng, nq, 16)
    gnd = _gnd(rng, nq, n)
    tracked = [np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in gnd]
    cfg = RefineConfig(query_expansion=True, qe_neighbors=2, database_augmentation=True,
                       dba_neighbors=3, rerank=True, rerank_m=40, rerank_k=4,
                       rerank_beta=0.2)
    res, seconds = refine.refine_and_search(q, db, cfg, tracked=tracked, k=10)
    assert set(seconds) >= {"database_augmentation", "query_expansion", "rerank"}
    db2 = ref_alpha_dba(db, 3, 3.0)
    q2 = ref_alpha_qe(q, db2, 2, 3.0)
    ranking = []
    for i in range(nq):
        full = ref_order(q2[i] @ db2.T)
        full[:40] = full[:40][ref_superglobal(q2[i], db2[full[:40]], 4, 0.2)]
        ranking.append(full)
    ref_map, _, _ = _ref_map(np.array(ranking).T, gnd, "medium")
    got = metrics.evaluate_setups(gnd, res.rank_of, setups=("medium",))
    assert got["medium"]["mAP"] == pytest.approx(100 * ref_map, abs=1e-6)


def test_refine_config_rules_and_record():
    with pytest.raises(SettingError, match=r"--rerank_m must be an integer >= 2"):
        EvalConfig(dataset="synth", data_root="d", output_dir="o",
                   refine=RefineConfig(rerank_m=1)).validate(check_model=False)
    cfg = RefineConfig(rerank=True, query_expansion=True)
    assert cfg.enabled == ("query_expansion", "rerank")
    assert cfg.info() == {"query_expansion": {"neighbors": 2, "alpha": 3.0},
                          "rerank": {"m": 400, "k": 9, "beta": 0.15}}
    assert RefineConfig().enabled == () and RefineConfig().info() == {}


# ------------------------------------------------------------------ evaluator and eval_main

def test_evaluator_default_off_identical_and_refinements_recorded(tmp_path, capsys):
    write_tiny_revisited(tmp_path / "data")
    kwargs = dict(dataset="roxford5k", data_root=str(tmp_path / "data"),
                  max_image_size=MAX_SIZE, scales=SCALES, distractors=True)
    plain = evaluator.run_evaluation(backend=fake_backend(), output_dir=str(tmp_path / "a"),
                                     **kwargs)
    assert "refinement" not in plain
    assert all("ap_without_refinement" not in p for p in plain["per_query"])
    # every refinement at its defaults but off: the same numbers as before
    off = evaluator.run_evaluation(
        EvalConfig(output_dir=str(tmp_path / "b"), refine=RefineConfig(), **kwargs),
        backend=fake_backend())
    assert off["metrics"] == plain["metrics"] and off["per_query"] == plain["per_query"]
    capsys.readouterr()
    # with the refinements (evaluate stage: the same features, no model)
    on_cfg = EvalConfig(output_dir=str(tmp_path / "a"), stage="evaluate",
                        refine=RefineConfig(query_expansion=True, database_augmentation=True,
                                            rerank=True, rerank_m=6, rerank_k=2), **kwargs)
    on = evaluator.run_evaluation(on_cfg)
    r = on["refinement"]
    assert r["ran"] == ["database_augmentation", "query_expansion", "rerank"]
    assert r["parameters"]["rerank"] == {"m": 6, "k": 2, "beta": 0.15}
    assert r["metrics_without"] == plain["metrics"]
    assert set(r["ms_per_query"]) >= {"query_expansion", "rerank"}
    printed = capsys.readouterr().out
    assert "| ROxf+1M +DBA+QE+rerank |" in printed and "rerank: m=6, k=2" in printed
    with open(on["outputs"]["json"]) as f:
        assert json.load(f)["refinement"]["ran"] == r["ran"]


def test_eval_main_refinement_flags_parse_and_are_recorded(tmp_path):
    write_tiny_revisited(tmp_path / "data", distractors=False)
    kwargs = dict(dataset="roxford5k", data_root=str(tmp_path / "data"),
                  max_image_size=MAX_SIZE, scales=SCALES, output_dir=str(tmp_path / "out"))
    plain = evaluator.run_evaluation(backend=fake_backend(), print_table=False, **kwargs)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "eval_main.py"), "--dataset=roxford5k",
         f"--data_root={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}",
         f"--max_image_size={MAX_SIZE}", "--scales=0.70710678,1", "--stage=evaluate",
         "--query_expansion", "--qe_neighbors=3", "--qe_alpha=2.5", "--rerank",
         "--rerank_m=5", "--rerank_k=2", "--rerank_beta=0.3"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "results-roxford5k.json") as f:
        res = json.load(f)
    assert res["refinement"]["parameters"] == {
        "query_expansion": {"neighbors": 3, "alpha": 2.5},
        "rerank": {"m": 5, "k": 2, "beta": 0.3}}
    assert res["refinement"]["metrics_without"] == plain["metrics"]
    assert "+QE+rerank" in proc.stdout
