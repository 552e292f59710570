"""Evaluation: gallery encoding, ranking, benchmark metrics and submission files."""

from .cache import cached_gallery
from .engine import EvaluationTask, Gallery, encode_gallery, encode_query_batch, evaluation_step, rank
from .evaluator import RetrievalEvaluator, TargetRecall
from .runner import EvaluationResult, evaluate, format_table, write_results

__all__ = [
    "EvaluationTask",
    "Gallery",
    "encode_gallery",
    "encode_query_batch",
    "evaluation_step",
    "rank",
    "cached_gallery",
    "RetrievalEvaluator",
    "TargetRecall",
    "EvaluationResult",
    "evaluate",
    "format_table",
    "write_results",
]
