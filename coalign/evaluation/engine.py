"""Gallery encoding and chunked ranking, shared by ``CoAlign.validation_step``, ``coalign evaluate`` and search.

The gallery is encoded once per run and kept on the CPU; ranking moves it to the queries' device one chunk at a
time and merges running top-k lists, so memory stays bounded by one chunk plus the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._features import QueryFeatures, TargetFeatures

__all__ = ["Gallery", "encode_gallery", "rank"]


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
    """Encode every image of a gallery loader (batches ``{"image", "image_id"}``) with ``model.encode_targets``."""
    ids: list[str] = []
    parts: list[TargetFeatures] = []
    device = model.device
    for batch in tqdm(loader, desc="encoding gallery", disable=not progress, unit="batch"):
        feats = model.encode_targets(batch["image"].to(device))
        parts.append(feats.to("cpu", dtype))
        ids.extend(str(i) for i in batch["image_id"])
    if not parts:
        raise ValueError("the gallery is empty")
    return Gallery(ids, TargetFeatures.cat(parts))


@torch.no_grad()
def rank(
    model,
    queries: QueryFeatures,
    gallery: Gallery,
    k: int = 50,
    exclude_ids: Sequence[str | None] | None = None,
    chunk_size: int = 16384,
) -> tuple[Tensor, Tensor]:
    """Top-k gallery positions and scores for each query, best first.

    Args:
        model: a ``CoAlign`` (uses ``model.similarity`` and, if configured, ``model.rerank``).
        queries: encoded queries (any device; ranking runs there).
        gallery: encoded gallery (CPU), moved chunk by chunk.
        k: list length; capped at the gallery size (minus one when excluding).
        exclude_ids: per query, a gallery id to remove from its ranking (the reference image), or None.
        chunk_size: gallery rows per chunk.

    Returns:
        ``(indices [Nq, k] long, scores [Nq, k] float)``, on the CPU.
    """
    n = len(gallery)
    if exclude_ids is not None and len(exclude_ids) != len(queries):
        raise ValueError(f"got {len(exclude_ids)} exclude ids for {len(queries)} queries")
    excluded = None
    if exclude_ids is not None:
        excluded = torch.tensor([gallery.position.get(e, -1) if e is not None else -1 for e in exclude_ids])
    rerank_k = int(getattr(model, "rerank_top_k", 0) or 0) if getattr(model, "local_head", None) is not None else 0
    keep = min(max(k, rerank_k), n)
    device = queries.embedding.device
    best_scores = torch.full((len(queries), 0), float("-inf"), device=device)
    best_index = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
    for start in range(0, n, chunk_size):
        chunk = gallery.features[start : start + chunk_size].to(device, queries.embedding.dtype)
        scores = model.similarity(queries.embedding, chunk.embedding).float()
        if excluded is not None:
            local = excluded.to(device) - start
            rows = torch.nonzero((local >= 0) & (local < scores.shape[1])).flatten()
            scores[rows, local[rows]] = float("-inf")
        index = torch.arange(start, start + scores.shape[1], device=device).expand_as(scores)
        all_scores = torch.cat([best_scores, scores], dim=1)
        all_index = torch.cat([best_index, index], dim=1)
        top = all_scores.topk(min(keep, all_scores.shape[1]), dim=1)
        best_scores, best_index = top.values, all_index.gather(1, top.indices)
    if rerank_k:
        best_index, best_scores = model.rerank(queries, gallery.features, best_index, best_scores)
    limit = min(k, n - (1 if excluded is not None and bool((excluded >= 0).any()) else 0))
    return best_index[:, :limit].cpu(), best_scores[:, :limit].cpu()
