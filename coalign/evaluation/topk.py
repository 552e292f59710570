"""The one exact top-k of coalign: a query set against a database held in chunks (evaluation and search share it).

The database (gallery features, a search index) stays where it lives, usually on the CPU; one chunk of rows at a
time moves to the queries' device, is scored, and its best k are merged into running top-k lists. Chunks are
sized so that the fp32 score block of one chunk stays under :data:`SCORE_BUDGET`, so CIRCO's 123,403-image
gallery or a million-photo index ranks on one GPU or a laptop without running out of memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SCORE_BUDGET", "TopK", "chunked_topk", "max_inner_product"]

#: bytes the fp32 score block of one (query chunk x database chunk x vectors per row) may take
SCORE_BUDGET = 256 * 2**20


class TopK(NamedTuple):
    """Best-first results, like ``torch.topk``: ``values [Q, k]`` scores and ``indices [Q, k]`` database rows."""

    values: Tensor
    indices: Tensor


def max_inner_product(queries: Tensor, rows: Tensor) -> Tensor:
    """``[Q, N]`` inner products; for a multi-vector database ``[N, V, E]`` the best of each row's V vectors."""
    if rows.dim() == 2:
        return queries @ rows.T  # a plain GEMM: no pass over a size-1 vector axis
    return torch.einsum("qe,nve->qnv", queries, rows).amax(dim=-1)


def rows_per_chunk(n_queries: int, vectors_per_row: int, minimum: int = 256) -> int:
    """Database rows per chunk so that one score block stays under :data:`SCORE_BUDGET`."""
    return max(minimum, SCORE_BUDGET // (4 * max(1, n_queries) * max(1, vectors_per_row)))


@torch.no_grad()
def chunked_topk(
    queries: Tensor,
    database: Tensor,
    k: int,
    similarity: Callable[[Tensor, Tensor], Tensor] | None = None,
    exclude: Tensor | None = None,
    chunk_rows: int | None = None,
) -> TopK:
    """Exact top-k database rows of every query, best first, in bounded memory.

    Args:
        queries: ``[Q, E]`` query embeddings; scoring runs on their device and dtype.
        database: ``[N, E]`` or ``[N, V, E]`` rows (any device; moved one chunk at a time).
        k: results per query (capped at N).
        similarity: ``(queries, rows) -> [Q, rows]`` scores, e.g. ``model.similarity``; None uses
            :func:`max_inner_product`.
        exclude: ``[Q]`` long, a database row to leave out of each query's results (-1: none), e.g. the
            query's own reference image.
        chunk_rows: rows per chunk; None sizes chunks by :data:`SCORE_BUDGET`.

    Returns:
        :class:`TopK` with ``values`` (float32) and ``indices`` (long), on the queries' device. Rows that were
        excluded never appear; when fewer than k rows remain, the lists are shorter.
    """
    n = database.shape[0]
    device = queries.device
    score = similarity or max_inner_product
    vectors = 1 if database.dim() == 2 else database.shape[1]
    rows = chunk_rows or rows_per_chunk(len(queries), vectors)
    limit = min(k, n - (1 if exclude is not None and bool((exclude >= 0).any()) else 0))
    best_values = torch.empty((len(queries), 0), dtype=torch.float32, device=device)
    best_indices = torch.empty((len(queries), 0), dtype=torch.long, device=device)
    excluded = None if exclude is None else exclude.to(device)
    for start in range(0, n, rows):
        chunk = database[start : start + rows].to(device, queries.dtype)
        scores = score(queries, chunk).float()
        del chunk
        if excluded is not None:
            local = excluded - start
            hit = torch.nonzero((local >= 0) & (local < scores.shape[1])).flatten()
            scores[hit, local[hit]] = float("-inf")
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_values = torch.cat([best_values, top.values], dim=1)
        merged_indices = torch.cat([best_indices, top.indices + start], dim=1)
        keep = merged_values.topk(min(k, merged_values.shape[1]), dim=1)
        best_values, best_indices = keep.values, merged_indices.gather(1, keep.indices)
    return TopK(best_values[:, :limit], best_indices[:, :limit])
