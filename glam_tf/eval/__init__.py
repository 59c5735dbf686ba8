"""Retrieval evaluation: test-set extraction, exact search, search-time refinements,
revisited/original metrics."""

from glam_tf.config.eval import DATASETS, EvalConfig
from glam_tf.eval.evaluator import Evaluator, evaluate_model, read_results, run_evaluation
from glam_tf.eval.metrics import (
    KAPPAS,
    SETUPS,
    average_precision,
    evaluate_setups,
    precision_at_k,
    ranks_after_removal,
    setup_ground_truth,
)
from glam_tf.eval.refine import (
    RerankedResult,
    database_augmentation,
    query_expansion,
    refine_and_search,
    rerank_search_result,
    superglobal_rerank,
)
from glam_tf.eval.search import SearchResult, approximate_search, exact_search, recall_at_k

__all__ = [
    "DATASETS", "EvalConfig", "Evaluator", "evaluate_model", "read_results", "run_evaluation",
    "KAPPAS", "SETUPS",
    "average_precision", "evaluate_setups", "precision_at_k", "ranks_after_removal",
    "setup_ground_truth", "SearchResult", "approximate_search", "exact_search", "recall_at_k",
    "RerankedResult", "database_augmentation", "query_expansion", "refine_and_search",
    "rerank_search_result", "superglobal_rerank",
]
