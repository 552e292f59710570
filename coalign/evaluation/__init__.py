"""Evaluation: gallery encoding, ranking, benchmark metrics and submission files."""

from .cache import cached_gallery
from .engine import Gallery, encode_gallery, encode_query_batch, evaluation_step, rank
from .metrics import CIRCOEvaluator, CIRREvaluator, FashionIQEvaluator, RetrievalEvaluator
from .runner import EvaluationResult, evaluate, format_table, write_results
from .submission import check_submission

__all__ = [
    "Gallery",
    "encode_gallery",
    "encode_query_batch",
    "evaluation_step",
    "rank",
    "cached_gallery",
    "RetrievalEvaluator",
    "FashionIQEvaluator",
    "CIRREvaluator",
    "CIRCOEvaluator",
    "EvaluationResult",
    "evaluate",
    "format_table",
    "write_results",
    "check_submission",
]
