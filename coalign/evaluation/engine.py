"""Gallery encoding and ranking, shared by ``CoAlign``'s validation and test steps and ``coalign evaluate``.

The gallery is encoded once per run into preallocated CPU tensors (no second copy at the end) and stays on
the CPU; ranking is :func:`~coalign.evaluation.topk.chunked_topk` over its global embeddings (the same top-k
as ``coalign search``), followed by the local head's re-ranking of the head of each list.

:func:`evaluation_step` is THE per-batch evaluation: encode the batch's queries, rank, update the benchmark
evaluator. The LightningModule's validation/test steps and ``coalign evaluate`` both call it, so they give the
same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._features import QueryFeatures, TargetFeatures
from .evaluator import RetrievalEvaluator
from .topk import chunked_topk, scoring_function

__all__ = [
    "Gallery",
    "EvaluationTask",
    "EvaluationOutcome",
    "encode_gallery",
    "rank",
    "evaluation_step",
    "encode_query_batch",
    "average_queries",
]


@dataclass
class Gallery:
    """Encoded gallery: ``ids[i]`` names the image whose features are row i of ``features`` (on the CPU)."""

    ids: list[str]
    features: TargetFeatures

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.features):
            raise ValueError(f"gallery has {len(self.ids)} ids but {len(self.features)} feature rows")
        self.position = {name: i for i, name in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def encode_gallery(model, loader: Iterable[dict], progress: bool = True, dtype: torch.dtype | None = None) -> Gallery:
    """Encode every image of a gallery loader (batches ``{"image", "image_id"}``) with ``model.encode_targets``.

    Args:
        model: anything with ``encode_targets(images)`` and ``device``.
        loader: gallery batches, in a fixed order.
        progress: show a progress bar (images encoded of the gallery's total).
        dtype: storage dtype of the features (e.g. ``torch.float16`` halves a large gallery); None keeps the
            model's.
    """
    ids: list[str] = []
    total = len(loader.dataset) if hasattr(getattr(loader, "dataset", None), "__len__") else None
    store: TargetFeatures | None = None
    parts: list[TargetFeatures] = []
    device = model.device
    # counts images, not batches (a 123K-image gallery); erased when done, so validation's own bar stays in view
    bar = tqdm(total=total, desc="encoding gallery", unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in loader:
        feats = model.encode_targets(batch["image"].to(device)).to("cpu", dtype)
        start = len(ids)
        ids.extend(str(i) for i in batch["image_id"])
        bar.update(len(ids) - start)
        if total is None:
            parts.append(feats)
            continue
        if store is None:  # preallocate: concatenating parts at the end would hold the gallery twice
            store = TargetFeatures(
                torch.empty((total, *feats.embedding.shape[1:]), dtype=feats.embedding.dtype),
                torch.empty((total, *feats.tokens.shape[1:]), dtype=feats.tokens.dtype),
            )
        if len(ids) > total:
            raise ValueError(f"the gallery loader yielded more than its dataset's {total} images")
        store.embedding[start : len(ids)] = feats.embedding
        store.tokens[start : len(ids)] = feats.tokens
    bar.close()
    if not ids:
        raise ValueError("the gallery is empty")
    features = TargetFeatures.cat(parts) if store is None else store[: len(ids)]
    return Gallery(ids, features)


@torch.no_grad()
def rank(
    model,
    queries: QueryFeatures,
    gallery: Gallery,
    k: int = 50,
    exclude_ids: Sequence[str | None] | None = None,
    chunk_size: int | None = None,
    query_chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-k gallery positions and scores for each query, best first.

    Args:
        model: a ``CoAlign`` (uses ``model.similarity`` and, if it has a local head, ``model.rerank`` on the
            first ``model.rerank_top_k`` candidates; the rest keep their global order behind them).
        queries: encoded queries (any device; ranking runs there).
        gallery: encoded gallery (CPU); only its global embeddings move, chunk by chunk.
        k: list length; capped at the gallery size (minus one when excluding).
        exclude_ids: per query, a gallery id to remove from its ranking (the reference image), or None.
        chunk_size: gallery rows per chunk; None sizes chunks by ``topk.CPU_BLOCK_BUDGET`` (CPU) or
            ``topk.SCORE_BUDGET``.
        query_chunk_size: queries ranked together (bounds the score block for large query sets).

    Returns:
        ``(indices [Nq, k] long, scores [Nq, k] float)``, on the CPU.
    """
    if exclude_ids is not None and len(exclude_ids) != len(queries):
        raise ValueError(f"got {len(exclude_ids)} exclude ids for {len(queries)} queries")
    excluded = None
    if exclude_ids is not None:
        excluded = torch.tensor([gallery.position.get(e, -1) if e is not None else -1 for e in exclude_ids])
    rerank_k = int(getattr(model, "rerank_top_k", 0) or 0) if getattr(model, "local_head", None) is not None else 0
    keep = max(k, rerank_k)
    limit = min(k, len(gallery) - (1 if excluded is not None and bool((excluded >= 0).any()) else 0))
    indices, scores = [], []
    for q0 in range(0, len(queries), query_chunk_size):
        part = queries[q0 : q0 + query_chunk_size]
        ex = None if excluded is None else excluded[q0 : q0 + query_chunk_size]
        top = chunked_topk(part.embedding, gallery.features.embedding, keep, scoring_function(model), ex, chunk_size)
        index, score = top.indices, top.values
        if rerank_k:
            head_index, head_scores = model.rerank(part, gallery.features, index[:, :rerank_k], score[:, :rerank_k])
            index = torch.cat([head_index.to(index.device), index[:, rerank_k:]], dim=1)
            score = torch.cat([head_scores.to(score.device).float(), score[:, rerank_k:]], dim=1)
        indices.append(index[:, :limit].cpu())
        scores.append(score[:, :limit].cpu())
    return torch.cat(indices), torch.cat(scores)


def average_queries(parts: Sequence[QueryFeatures]) -> QueryFeatures:
    """One query from several encodings of it (FashionIQ's both caption orders): mean, re-normalised."""
    embedding = F.normalize(torch.stack([p.embedding for p in parts]).mean(dim=0), dim=-1)
    tokens = torch.stack([p.tokens for p in parts]).mean(dim=0)
    masks = [p.token_mask for p in parts]
    mask = None if all(m is None for m in masks) else torch.stack([m for m in masks if m is not None]).any(dim=0)
    return QueryFeatures(embedding, tokens, mask)


@torch.no_grad()
def encode_query_batch(model, batch: dict, text_keys: Sequence[str] = ("text",)) -> QueryFeatures:
    """Encode a query batch's reference images with the texts under ``text_keys`` (averaged if several)."""
    reference = batch["reference"].to(model.device)
    parts = [model.encode_queries(reference, list(batch[key])) for key in text_keys]
    return parts[0] if len(parts) == 1 else average_queries(parts)


@torch.no_grad()
def evaluation_step(model, batch: dict, gallery: Gallery, evaluator: RetrievalEvaluator) -> tuple[Tensor, Tensor]:
    """Evaluate one query batch: encode, rank against ``gallery``, update ``evaluator``.

    Args:
        model: a ``CoAlign`` (``encode_queries``, ``similarity``, ``device``).
        batch: a query batch of a DataModule with a gallery (``reference``, ``text``, ``reference_id``, labels).
        gallery: the split's encoded gallery; check it once with ``evaluator.check_gallery(gallery.ids)``.
        evaluator: from ``datamodule.build_evaluator(split)``.

    Returns:
        ``(indices, scores)`` of the ranking (gallery positions, CPU), e.g. to show examples.
    """
    keys = evaluator.query_text_keys
    queries = encode_query_batch(model, batch, keys)
    exclude = [str(r) for r in batch["reference_id"]] if evaluator.exclude_reference else None
    index, scores = rank(model, queries, gallery, k=evaluator.top_k, exclude_ids=exclude)
    device = queries.embedding.device
    if evaluator.device != device:
        evaluator.to(device)  # DDP syncs metric states on the model's device (NCCL needs CUDA tensors)
    evaluator.update(batch, index, scores, query_text_keys=keys)
    return index, scores


@dataclass
class EvaluationTask:
    """What a DataModule hands the model to evaluate one split against its gallery
    (``CIRDataModule.evaluation_task``).

    Attributes:
        split: the split's name (``"val"``, ``"test1"``, ...).
        gallery: loader of gallery batches ``{"image", "image_id"}`` in a fixed order.
        evaluator: a fresh evaluator of the split.
        upload_files: turns the finished evaluator into the benchmark's upload files (file name -> JSON object).
    """

    split: str
    gallery: Any
    evaluator: RetrievalEvaluator
    upload_files: Callable[[RetrievalEvaluator], dict[str, dict]] = lambda evaluator: {}


@dataclass
class EvaluationOutcome:
    """The result of one validation or test run, as ``CoAlign.last_evaluation`` hands it to callbacks.

    Attributes:
        stage: ``"val"`` or ``"test"``.
        split: the evaluated split.
        metrics: percentages keyed like ``"cirr/R@1"`` (empty for a split without labels).
        examples: the first queries with their ranked gallery ids (``reference``, ``text``, ``target_id``,
            ``ranked_ids``), for pictures.
        upload_files: the rankings in the benchmark's upload formats (file name -> JSON object).
        gallery_images: the gallery dataset (items ``{"image", "image_id"}``), to draw results.
    """

    stage: str
    split: str
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    upload_files: dict[str, dict] = field(default_factory=dict)
    gallery_images: Any = None
