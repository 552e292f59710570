"""Gallery encoding and chunked ranking, shared by ``CoAlign.validation_step``, ``coalign evaluate`` and search.

The gallery is encoded once per run into preallocated CPU tensors (no second copy at the end) and stays on
the CPU; ranking moves only its global embeddings to the queries' device, one chunk at a time, and merges
running top-k lists. Chunks are sized so the score block of one chunk stays under a memory budget, so
CIRCO's 123,403-image gallery ranks on one GPU (or a laptop) without running out of memory.

:func:`evaluation_step` is THE per-batch evaluation: encode the batch's queries, rank, update the benchmark
evaluator. The LightningModule's validation/test steps and ``coalign evaluate`` both call it, so they give the
same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._features import QueryFeatures, TargetFeatures

__all__ = ["Gallery", "encode_gallery", "rank", "evaluation_step", "encode_query_batch", "average_queries"]

#: bytes the fp32 score block of one (query chunk x gallery chunk x K) may take
SCORE_BUDGET = 256 * 2**20


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
        progress: show a progress bar.
        dtype: storage dtype of the features (e.g. ``torch.float16`` halves a large gallery); None keeps the
            model's.
    """
    ids: list[str] = []
    total = len(loader.dataset) if hasattr(getattr(loader, "dataset", None), "__len__") else None
    store: TargetFeatures | None = None
    parts: list[TargetFeatures] = []
    device = model.device
    for batch in tqdm(loader, desc="encoding gallery", disable=not progress, unit="batch"):
        feats = model.encode_targets(batch["image"].to(device)).to("cpu", dtype)
        start = len(ids)
        ids.extend(str(i) for i in batch["image_id"])
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
    if not ids:
        raise ValueError("the gallery is empty")
    features = TargetFeatures.cat(parts) if store is None else store[: len(ids)]
    return Gallery(ids, features)


def _rows_per_chunk(n_queries: int, k_vectors: int, chunk_size: int | None) -> int:
    if chunk_size:
        return chunk_size
    return max(256, SCORE_BUDGET // (4 * max(1, n_queries) * max(1, k_vectors)))


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
        chunk_size: gallery rows per chunk; None sizes chunks to keep the score block under ``SCORE_BUDGET``.
        query_chunk_size: queries ranked together (bounds the score block for large query sets).

    Returns:
        ``(indices [Nq, k] long, scores [Nq, k] float)``, on the CPU.
    """
    if exclude_ids is not None and len(exclude_ids) != len(queries):
        raise ValueError(f"got {len(exclude_ids)} exclude ids for {len(queries)} queries")
    excluded = None
    if exclude_ids is not None:
        excluded = torch.tensor([gallery.position.get(e, -1) if e is not None else -1 for e in exclude_ids])
    n = len(gallery)
    limit = min(k, n - (1 if excluded is not None and bool((excluded >= 0).any()) else 0))
    indices, scores = [], []
    for q0 in range(0, len(queries), query_chunk_size):
        part = queries[q0 : q0 + query_chunk_size]
        ex = None if excluded is None else excluded[q0 : q0 + query_chunk_size]
        index, score = _rank_chunk(model, part, gallery, k, ex, chunk_size)
        indices.append(index[:, :limit].cpu())
        scores.append(score[:, :limit].cpu())
    return torch.cat(indices), torch.cat(scores)


def _rank_chunk(model, queries: QueryFeatures, gallery: Gallery, k: int, excluded, chunk_size):
    n = len(gallery)
    rerank_k = int(getattr(model, "rerank_top_k", 0) or 0) if getattr(model, "local_head", None) is not None else 0
    keep = min(max(k, rerank_k), n)
    device, dtype = queries.embedding.device, queries.embedding.dtype
    embedding = gallery.features.embedding
    rows = _rows_per_chunk(len(queries), embedding.shape[1] if embedding.dim() == 3 else 1, chunk_size)
    best_scores = torch.full((len(queries), 0), float("-inf"), device=device)
    best_index = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
    local_excluded = None if excluded is None else excluded.to(device)
    for start in range(0, n, rows):
        chunk = embedding[start : start + rows].to(device, dtype)  # tokens stay put: only re-ranking reads them
        chunk_scores = model.similarity(queries.embedding, chunk).float()
        del chunk
        if local_excluded is not None:
            local = local_excluded - start
            hit = torch.nonzero((local >= 0) & (local < chunk_scores.shape[1])).flatten()
            chunk_scores[hit, local[hit]] = float("-inf")
        index = torch.arange(start, start + chunk_scores.shape[1], device=device).expand_as(chunk_scores)
        all_scores = torch.cat([best_scores, chunk_scores], dim=1)
        all_index = torch.cat([best_index, index], dim=1)
        del chunk_scores, index
        top = all_scores.topk(min(keep, all_scores.shape[1]), dim=1)
        best_scores, best_index = top.values, all_index.gather(1, top.indices)
        del all_scores, all_index, top
    if rerank_k:
        head_index, head_scores = model.rerank(
            queries, gallery.features, best_index[:, :rerank_k], best_scores[:, :rerank_k]
        )
        best_index = torch.cat([head_index.to(device), best_index[:, rerank_k:]], dim=1)
        best_scores = torch.cat([head_scores.to(device).float(), best_scores[:, rerank_k:]], dim=1)
    return best_index, best_scores


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
def evaluation_step(model, batch: dict, gallery: Gallery, evaluator) -> tuple[Tensor, Tensor]:
    """Evaluate one query batch: encode, rank against ``gallery``, update ``evaluator``.

    Args:
        model: a ``CoAlign`` (``encode_queries``, ``similarity``, ``device``).
        batch: a query batch of a benchmark DataModule (``reference``, ``text``, ``reference_id``, labels).
        gallery: the split's encoded gallery, in the order of ``evaluator.gallery_ids``.
        evaluator: from ``datamodule.build_evaluator(split)``.

    Returns:
        ``(indices, scores)`` of the ranking (gallery positions, CPU), e.g. to show examples.
    """
    # benchmark evaluators take gallery positions (no 100k-string lists per batch); any other evaluator of the
    # base contract (e.g. TargetRecall) gets gallery ids
    takes_positions = hasattr(evaluator, "gallery_ids") and hasattr(evaluator, "query_text_keys")
    if takes_positions and getattr(evaluator, "_gallery_checked", None) is not gallery:
        if gallery.ids != evaluator.gallery_ids:
            raise ValueError("the gallery was not encoded from this evaluator's split (ids or order differ)")
        evaluator._gallery_checked = gallery
    keys = tuple(getattr(evaluator, "query_text_keys", ("text",)))
    queries = encode_query_batch(model, batch, keys)
    exclude = [str(r) for r in batch["reference_id"]] if evaluator.exclude_reference else None
    index, scores = rank(model, queries, gallery, k=evaluator.top_k, exclude_ids=exclude)
    device = queries.embedding.device
    if hasattr(evaluator, "to") and getattr(evaluator, "device", device) != device:
        evaluator.to(device)  # DDP syncs metric states on the model's device (NCCL needs CUDA tensors)
    if takes_positions:
        evaluator.update(batch, index, scores, query_text_keys=keys)
    else:
        evaluator.update(batch, [[gallery.ids[i] for i in row] for row in index.tolist()], scores)
    return index, scores
