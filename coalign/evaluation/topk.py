"""The one exact top-k of coalign: a query set against a database held in blocks (evaluation and search share it).

The database (gallery features, a search index) stays where it lives, usually on the CPU; one block of rows at a
time is scored against all queries and only each query's best candidates survive it, so CIRCO's 123,403-image
gallery or a million-photo index ranks on one GPU or a laptop without running out of memory.

Two implementations give the same ranking (:func:`chunked_topk` picks one, ``backend="auto"``: FAISS for
single-vector rows on the CPU when it is installed, torch otherwise):

- **FAISS** (``pip install coalign[faiss]``), on the CPU, when scores are max inner products: ``faiss.knn`` runs on
  the embeddings in place (no copy, no index to build). For ``[N, V, E]`` rows (BLIP-2 keeps V = 32 vectors per
  image; only with ``backend="faiss"``, as the torch path is faster there) it takes the best ``(k + 1) * V + 1``
  vectors and keeps each image's best one: the k best images own at most k * V vectors that beat the k-th
  image's score, so the candidates hold all of them. Each query's list is then *proved* exact: its k-th score
  must beat the last vector FAISS returned (so nothing left out could tie or beat it); a query that fails the
  proof (exact ties at the edge) is ranked again by the torch path.
- **torch**: one GEMM per block into a preallocated score buffer (``database_block @ queries.T``, so the V
  vectors of an image are adjacent rows and their max is one vectorised pass), then a two-level selection: the
  block's rows are cut into groups of :data:`GROUP`, the k groups with the best maxima are found, and only their
  ``k * GROUP`` rows are ranked (:func:`_merge_block` proves this exact); queries whose block maximum cannot
  beat their k-th best so far skip the block. Blocks are sized from a memory budget (:data:`CPU_BLOCK_BUDGET`,
  :data:`SCORE_BUDGET`), so the cost is the GEMM plus about one pass over its output.

**Order and ties.** Results are best first by score; equal scores are ordered by database row, lower first, and at
the k-th place the lower row wins. Both paths encode (score, row) into one int64 key (:func:`_order_keys`), so
their ``topk`` cannot break a tie any other way; the FAISS path's proof rejects any list where a tie at the edge
could have been cut. The paths agree on ids whenever their scores are equal (their GEMMs may differ in the last
bit of a score, which can only reorder scores that are equal to rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..heads.base import GlobalHead, max_over_embeddings

__all__ = [
    "SCORE_BUDGET",
    "CPU_BLOCK_BUDGET",
    "GROUP",
    "TopK",
    "chunked_topk",
    "max_inner_product",
    "scoring_function",
    "faiss_available",
    "candidate_topk",
]

#: bytes the score block of one (query chunk x database chunk x vectors per row) may take on an accelerator
SCORE_BUDGET = 256 * 2**20
#: the same on the CPU, where a block that stays in the last-level cache between its GEMM and its max/selection
#: passes is faster than a large one (measured in PERFORMANCE.md, "Search")
CPU_BLOCK_BUDGET = 32 * 2**20
#: rows per group of the torch path's two-level selection
GROUP = 32

_LOW = 2**32 - 1  # the row part of an order key: rows up to 4,294,967,295
_SIGN_FLIP = 0x7FFFFFFF
_EMPTY = torch.iinfo(torch.long).min  # the key of "no row yet"

Backend = Literal["auto", "torch", "faiss"]


class TopK(NamedTuple):
    """Best-first results, like ``torch.topk``: ``values [Q, k]`` scores and ``indices [Q, k]`` database rows."""

    values: Tensor
    indices: Tensor


def max_inner_product(queries: Tensor, rows: Tensor) -> Tensor:
    """``[Q, N]`` inner products; for a multi-vector database ``[N, V, E]`` the best of each row's V vectors."""
    if rows.dim() == 2:
        return queries @ rows.T  # a plain GEMM: no pass over a size-1 vector axis
    return torch.einsum("qe,nve->qnv", queries, rows).amax(dim=-1)


def scoring_function(model) -> Callable[[Tensor, Tensor], Tensor] | None:
    """What to pass as :func:`chunked_topk`'s ``similarity`` for ``model`` (a ``CoAlign``).

    None when the model's global head scores by the max inner product (the default
    :meth:`coalign.heads.base.GlobalHead.similarity`): :func:`chunked_topk` then computes exactly that with its
    fast paths (FAISS, or the preallocated GEMM). Otherwise ``model.similarity``, called block by block.
    """
    head = getattr(model, "global_head", None)
    if isinstance(head, GlobalHead) and type(head).similarity is GlobalHead.similarity:
        return None
    return model.similarity


def faiss_available() -> bool:
    """Whether the ``faiss`` module can be imported (the ``faiss`` extra)."""
    return _faiss() is not None


def _faiss():
    try:
        import faiss  # an optional, heavy dependency: imported only when a search may use it
    except ImportError:
        return None
    return faiss


def rows_per_chunk(n_queries: int, vectors_per_row: int, minimum: int = 256, budget: int = SCORE_BUDGET) -> int:
    """Database rows per block so that one fp32 score block stays under ``budget`` bytes."""
    return max(minimum, budget // (4 * max(1, n_queries) * max(1, vectors_per_row)))


# -- order keys: (score desc, row asc) as one int64 -------------------------------------------------------------
def _order_keys(values: Tensor, rows: Tensor) -> Tensor:
    """int64 keys whose descending order is (score descending, row ascending); -0.0 counts as 0.0."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0, so they tie
    ordered = bits ^ ((bits >> 31) & _SIGN_FLIP)  # an int32 in the floats' order (negative floats flipped)
    return ordered.long() * (_LOW + 1) + (_LOW - rows)


def _unpack(keys: Tensor) -> TopK:
    ordered = (keys >> 32).int()
    values = (ordered ^ ((ordered >> 31) & _SIGN_FLIP)).view(torch.float32)
    return TopK(values, _LOW - (keys & _LOW))


def _best_keys(keys: Tensor, k: int) -> Tensor:
    return keys.topk(min(k, keys.shape[1]), dim=1).values


# -- the torch path ---------------------------------------------------------------------------------------------
def _merge_block(best: Tensor, scores: Tensor, k: int, start: int) -> None:
    """Merge one block of scores ``[Q, B]`` (its columns are rows ``start ...``) into the keys ``best [Q, k]``.

    Two levels: the block's columns are cut into groups of :data:`GROUP` adjacent columns, ranked by (their max
    desc, group asc). If one of the k best columns, x, lay in a group G that k other groups beat, each of those
    groups would hold a column beating x: so the k best columns lie in the k best groups (plus the tail that fills
    no whole group), and only those ``k * GROUP`` columns are ranked. A query whose best score in the block does
    not beat its k-th best so far (a later row loses a tie) is skipped: after the first blocks, most are.
    """
    n_queries, width = scores.shape
    device = scores.device
    if not (scores.is_contiguous() or scores.T.is_contiguous()):
        scores = scores.contiguous()
    groups = width // GROUP
    if groups <= 2 * k:  # grouping would not leave out enough to pay for itself
        rows = torch.arange(start, start + width, device=device).expand(n_queries, -1)
        best.copy_(_best_keys(torch.cat([best, _order_keys(scores, rows)], dim=1), k))
        return
    head = scores[:, : groups * GROUP]
    if head.stride(0) == 1:  # the GEMM buffer [B, Q]: reduce over its outer axis, vectorised across queries
        maxima = head.T.view(groups, GROUP, n_queries).amax(dim=1)
        top = maxima.amax(dim=0)
        maxima = maxima.T
    else:
        maxima = head.unflatten(1, (groups, GROUP)).amax(dim=2)
        top = maxima.amax(dim=1)
    tail = torch.arange(groups * GROUP, width, device=device)
    if len(tail):
        top = torch.maximum(top, scores[:, groups * GROUP :].amax(dim=1))
    floor = _unpack(best[:, -1]).values
    filled = best[:, -1] != _EMPTY
    active = torch.nonzero(~filled | (top.float() > floor)).flatten()
    if len(active) == 0:
        return
    maxima = maxima[active]
    # a group whose max does not beat the query's k-th best so far holds nothing for it: rank only as many
    # groups as the neediest active query has that do (after the first blocks, one or two instead of k)
    needed = int((maxima.float() > floor[active].unsqueeze(1)).sum(dim=1).max()) if bool(filled.all()) else k
    group_ids = torch.arange(groups, device=device)
    chosen = _order_keys(maxima, group_ids).topk(min(k, max(needed, 1)), dim=1).indices  # ties: lower group
    columns = ((chosen * GROUP).unsqueeze(2) + torch.arange(GROUP, device=device)).flatten(1)
    if len(tail):
        columns = torch.cat([columns, tail.expand(len(active), -1)], dim=1)
    row_stride, column_stride = scores.stride()  # a dense block ([Q, B] or the buffer's [B, Q]): gather flat
    values = scores.T.reshape(-1) if row_stride == 1 else scores.reshape(-1)
    where = active.unsqueeze(1) * row_stride + columns * column_stride
    values = values.index_select(0, where.flatten()).view_as(where)  # index_select: ~3x faster than take
    keys = _order_keys(values, columns + start)
    best[active] = _best_keys(torch.cat([best[active], keys], dim=1), k)


def _exclude_inplace(scores: Tensor, excluded: Tensor | None, start: int) -> None:
    if excluded is None:
        return
    local = excluded - start
    hit = torch.nonzero((local >= 0) & (local < scores.shape[1])).flatten()
    if len(hit):
        scores[hit, local[hit]] = float("-inf")


def _torch_topk(
    queries: Tensor,
    database: Tensor,
    k: int,
    similarity: Callable[[Tensor, Tensor], Tensor] | None,
    excluded: Tensor | None,
    rows: int,
) -> Tensor:
    """Order keys ``[Q, <=k]`` of the k best rows, block by block."""
    n, device = database.shape[0], queries.device
    vectors = 1 if database.dim() == 2 else database.shape[1]
    best = torch.full((len(queries), k), _EMPTY, dtype=torch.long, device=device)
    score_buffer = image_buffer = None
    if similarity is None:
        # one buffer for the whole search: [rows * V, Q], so an image's V vector scores are adjacent rows
        score_buffer = torch.empty((min(rows, n) * vectors, len(queries)), dtype=queries.dtype, device=device)
        if vectors > 1:
            image_buffer = torch.empty((min(rows, n), len(queries)), dtype=queries.dtype, device=device)
    for start in range(0, n, rows):
        chunk = database[start : start + rows].to(device, queries.dtype)
        size = chunk.shape[0]
        if similarity is None:
            flat = chunk.reshape(size * vectors, chunk.shape[-1])
            block = torch.mm(flat, queries.T, out=score_buffer[: size * vectors])
            if vectors > 1:
                block = torch.amax(block.view(size, vectors, -1), dim=1, out=image_buffer[:size])
            scores = block.T  # [Q, size], a view
        else:
            scores = similarity(queries, chunk).float()
        del chunk
        _exclude_inplace(scores, excluded, start)
        _merge_block(best, scores, k, start)
    return best


# -- the FAISS path ---------------------------------------------------------------------------------------------
def _faiss_topk(faiss, queries: Tensor, database: Tensor, k: int, excluded: Tensor | None, rows: int) -> Tensor:
    """Order keys ``[Q, <=k]`` from ``faiss.knn``, each query's list proved exact or ranked again by torch."""
    n = database.shape[0]
    vectors = 1 if database.dim() == 2 else database.shape[1]
    dim = database.shape[-1]
    query_array = queries.detach().to("cpu", torch.float32).contiguous().numpy()
    wanted = (k + (1 if excluded is not None else 0)) * vectors + 1
    keys, edge, complete = [], None, True
    for start in range(0, n, rows):
        chunk = database[start : start + rows]
        flat = chunk.reshape(-1, dim).to("cpu", torch.float32).contiguous()  # no copy when it already is
        m = min(wanted, flat.shape[0])
        found_scores, found = faiss.knn(query_array, flat.numpy(), m, metric=faiss.METRIC_INNER_PRODUCT)
        found_scores, found = torch.from_numpy(found_scores), torch.from_numpy(found)
        if m < flat.shape[0]:  # vectors were left out: none of them beats this block's last score
            complete = False
            last = found_scores[:, -1]
            edge = last if edge is None else torch.maximum(edge, last)
        images = found // vectors + start
        if excluded is not None:
            found_scores = found_scores.masked_fill(images == excluded.cpu().unsqueeze(1), float("-inf"))
        keys.append(_image_keys(found_scores, images, vectors))
    best = _best_keys(torch.cat(keys, dim=1), k)
    if complete:
        return best
    values = _unpack(best).values
    # exact when the k-th image beats every vector left out; otherwise (a tie at the edge) rank again with torch
    doubtful = (values[:, -1] <= edge) if values.shape[1] == k else torch.ones(len(best), dtype=torch.bool)
    doubtful = torch.nonzero(doubtful).flatten()
    if len(doubtful):
        redo = _torch_topk(
            queries[doubtful.to(queries.device)].to("cpu", torch.float32),
            database,
            k,
            None,
            None if excluded is None else excluded.cpu()[doubtful],
            rows_per_chunk(len(doubtful), vectors, budget=CPU_BLOCK_BUDGET),
        )
        best[doubtful] = redo
    return best


def _image_keys(scores: Tensor, images: Tensor, vectors: int) -> Tensor:
    """Order keys of each image's best vector among the found ones (its other vectors get the lowest key)."""
    keys = _order_keys(scores, images)
    if vectors == 1:
        return keys
    keys = keys.sort(dim=1, descending=True).values  # best first
    rows = _LOW - (keys & _LOW)
    rows, order = rows.sort(dim=1, stable=True)  # by image, best first within an image
    keys = keys.gather(1, order)
    repeat = torch.zeros_like(rows, dtype=torch.bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    return keys.masked_fill(repeat, _EMPTY)


# -- the entry point --------------------------------------------------------------------------------------------
@torch.no_grad()
def chunked_topk(
    queries: Tensor,
    database: Tensor,
    k: int,
    similarity: Callable[[Tensor, Tensor], Tensor] | None = None,
    exclude: Tensor | None = None,
    chunk_rows: int | None = None,
    *,
    backend: Backend = "auto",
) -> TopK:
    """Exact top-k database rows of every query, best first (ties: lower row first), in bounded memory.

    Args:
        queries: ``[Q, E]`` query embeddings; scoring runs on their device and dtype.
        database: ``[N, E]`` or ``[N, V, E]`` rows (any device; moved one block at a time).
        k: results per query (capped at N).
        similarity: ``(queries, rows) -> [Q, rows]`` scores, e.g. ``model.similarity``; None scores by the max
            inner product (:func:`max_inner_product`) with the fast paths. :func:`scoring_function` says which
            one a model needs.
        exclude: ``[Q]`` long, a database row to leave out of each query's results (-1: none), e.g. the
            query's own reference image.
        chunk_rows: rows per block; None sizes blocks by :data:`CPU_BLOCK_BUDGET` (CPU) or :data:`SCORE_BUDGET`.
        backend: ``"auto"`` (FAISS when it is installed, the queries are on the CPU, ``similarity`` is None and
            the rows are single vectors; otherwise torch), ``"torch"`` or ``"faiss"``.

    Returns:
        :class:`TopK` with ``values`` (float32) and ``indices`` (long), on the queries' device. Rows that were
        excluded never appear; when fewer than k rows remain, the lists are shorter.
    """
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    if database.dim() not in (2, 3) or queries.dim() != 2 or queries.shape[-1] != database.shape[-1]:
        raise ValueError(
            f"chunked_topk needs queries [Q, E] and a database [N, E] or [N, V, E], got {tuple(queries.shape)} and "
            f"{tuple(database.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if similarity is max_inner_product or similarity is max_over_embeddings:
        similarity = None  # the same scores, computed by the fast paths
    n, device = database.shape[0], queries.device
    vectors = 1 if database.dim() == 2 else database.shape[1]
    excluded = None if exclude is None else exclude.to(device=device, dtype=torch.long)
    limit = min(k, n - (1 if excluded is not None and bool((excluded >= 0).any()) else 0))
    if limit <= 0 or len(queries) == 0:
        empty = torch.empty((len(queries), 0), device=device)
        return TopK(empty.float(), empty.long())
    k = min(k, n)
    faiss = None
    # auto: FAISS for one vector per row only; over [N, V, E] rows it must return (k + 1) * V vectors per query,
    # and its large-k heaps made it 5.8x slower than the torch path's max-then-select (PERFORMANCE.md, "Search")
    if similarity is None and device.type == "cpu" and (backend == "faiss" or (backend == "auto" and vectors == 1)):
        faiss = _faiss()
    if backend == "faiss" and faiss is None:
        raise ValueError(
            "backend 'faiss' needs faiss installed (pip install coalign[faiss]), queries on the CPU and scores by "
            "inner product (similarity None)"
        )
    if faiss is not None:
        contiguous = database.device.type == "cpu" and database.dtype == torch.float32 and database.is_contiguous()
        rows = chunk_rows or (n if contiguous else rows_per_chunk(1, vectors * database.shape[-1]))
        keys = _faiss_topk(faiss, queries, database, k, excluded, rows)
    else:
        budget = CPU_BLOCK_BUDGET if device.type == "cpu" else SCORE_BUDGET
        rows = chunk_rows or rows_per_chunk(len(queries), vectors, minimum=4 * GROUP * k, budget=budget)
        keys = _torch_topk(queries, database, k, similarity, excluded, rows)
    top = _unpack(keys[:, :limit].to(device))
    return TopK(top.values, top.indices)


@torch.no_grad()
def candidate_topk(
    queries: Tensor,
    database: Tensor,
    candidates: Tensor,
    k: int,
    similarity: Callable[[Tensor, Tensor], Tensor] | None = None,
    exclude: Tensor | None = None,
) -> TopK:
    """Exact top-k among given candidate rows of each query (e.g. an approximate index's), same order as
    :func:`chunked_topk` (score desc, lower row first).

    Args:
        queries: ``[Q, E]``.
        database: ``[N, E]`` or ``[N, V, E]`` rows.
        candidates: ``[Q, C]`` long rows per query; -1 and repeats are ignored.
        k: results per query.
        similarity: as in :func:`chunked_topk` (None: max inner product).
        exclude: ``[Q]`` long, a row to leave out per query (-1: none).

    Returns:
        :class:`TopK` ``[Q, k']`` on the queries' device, k' = min(k, the fewest valid candidates of a query).
    """
    device = queries.device
    rows = candidates.to(device=device, dtype=torch.long).sort(dim=1).values
    invalid = rows < 0
    invalid[:, 1:] |= rows[:, 1:] == rows[:, :-1]
    if exclude is not None:
        invalid |= rows == exclude.to(device).unsqueeze(1)
    safe = rows.clamp(min=0)
    scores = torch.empty(rows.shape, dtype=torch.float32, device=device)
    if similarity is None:  # a batched GEMV per query block, its gathered rows within SCORE_BUDGET
        per_query = max(1, rows.shape[1] * database[0].numel() * 4)
        step = max(1, SCORE_BUDGET // per_query)
        for q0 in range(0, len(queries), step):
            block = safe[q0 : q0 + step]
            chosen = database[block.to(database.device)].to(device, queries.dtype)  # [q, C, (V,) E]
            chosen = chosen.reshape(len(block), -1, chosen.shape[-1])
            dots = torch.bmm(chosen, queries[q0 : q0 + step].unsqueeze(2)).view(len(block), rows.shape[1], -1)
            scores[q0 : q0 + step] = dots.amax(dim=2).float()
    else:
        for i in range(len(queries)):  # a model's similarity, one query at a time
            chosen = database[safe[i].to(database.device)].to(device, queries.dtype)
            scores[i] = similarity(queries[i : i + 1], chosen)[0].float()
    keys = _order_keys(scores, safe).masked_fill(invalid, _EMPTY)
    width = min(k, int((~invalid).sum(dim=1).min()) if len(rows) else 0)
    return _unpack(keys.topk(width, dim=1).values) if width else TopK(scores[:, :0], rows[:, :0])
