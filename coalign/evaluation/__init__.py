"""Benchmark-agnostic evaluation: gallery encoding, the one top-k, ranking, the evaluator base, the gallery cache
and the runner behind ``coalign evaluate``.

Nothing here knows a benchmark: FashionIQ, CIRR and CIRCO (their parsers, evaluators and upload files) live in
``coalign.datamodules``, and reach this package only through the ``RetrievalEvaluator`` and gallery loader a
DataModule builds.
"""

from .cache import cached_gallery
from .engine import (
    EvaluationOutcome,
    EvaluationTask,
    Gallery,
    encode_gallery,
    encode_query_batch,
    evaluation_step,
    rank,
)
from .evaluator import RetrievalEvaluator, TargetRecall
from .runner import EvaluationResult, evaluate, result_table, write_results
from .topk import TopK, chunked_topk

__all__ = [
    "EvaluationTask",
    "EvaluationOutcome",
    "Gallery",
    "encode_gallery",
    "encode_query_batch",
    "evaluation_step",
    "rank",
    "chunked_topk",
    "TopK",
    "cached_gallery",
    "RetrievalEvaluator",
    "TargetRecall",
    "EvaluationResult",
    "evaluate",
    "result_table",
    "write_results",
]
