"""Tensor helpers for rankings held as gallery positions (``-1`` marks an empty slot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["BIG", "compact", "head", "lookup_positions", "rank_lookup", "to_positions"]

#: rank given to an image that a ranking does not contain
BIG = 1 << 40


def compact(positions: Tensor, keep: Tensor) -> Tensor:
    """Move the kept entries of each row to the front, in their order, and fill the rest with -1."""
    order = torch.argsort((~keep).to(torch.int32), dim=1, stable=True)
    out = positions.gather(1, order)
    filled = torch.arange(out.shape[1], device=out.device)[None, :] < keep.sum(dim=1, keepdim=True)
    return torch.where(filled, out, torch.full_like(out, -1))


def head(positions: Tensor, length: int) -> Tensor:
    """The first ``length`` columns, padded with -1 when a row is shorter (a gallery smaller than the list)."""
    if positions.shape[1] >= length:
        return positions[:, :length]
    pad = torch.full((positions.shape[0], length - positions.shape[1]), -1, dtype=positions.dtype)
    return torch.cat([positions, pad.to(positions.device)], dim=1)


def rank_lookup(positions: Tensor, gallery_size: int) -> Tensor:
    """``[B, gallery_size]``: the rank of each gallery image in each row's ranking, ``BIG`` when absent."""
    b, length = positions.shape
    table = torch.full((b, gallery_size + 1), BIG, dtype=torch.long, device=positions.device)
    # empty slots write into the spare last column, which is dropped
    columns = torch.where(positions >= 0, positions, gallery_size)
    ranks = torch.arange(length, device=positions.device).expand(b, length)
    table.scatter_(1, columns, torch.where(positions >= 0, ranks, BIG))
    return table[:, :gallery_size]


def lookup_positions(
    names: Sequence[str] | Sequence[Sequence[str]],
    position: Mapping[str, int],
    device=None,
    missing: int | None = None,
) -> Tensor:
    """Gallery positions of names: ``[B]`` for a flat list, ``[B, W]`` (padded with -1) for a list of lists.

    An empty name means "unknown" and maps to -1. A name not in the gallery raises, unless ``missing`` gives
    the value to use instead (labels may name an image outside the gallery; such a label can never be hit).
    """

    def one(name) -> int:
        name = str(name)
        if name == "":
            return -1
        if name in position:
            return position[name]
        if missing is None:
            raise ValueError(f"{name!r} is not in the gallery")
        return missing

    if len(names) and not isinstance(names[0], str) and isinstance(names[0], Sequence):
        width = max(1, max(len(row) for row in names))
        rows = [[one(n) for n in row] + [-1] * (width - len(row)) for row in names]
        return torch.tensor(rows, dtype=torch.long, device=device).view(len(names), width)
    return torch.tensor([one(n) for n in names], dtype=torch.long, device=device)


def to_positions(ranked: Sequence[Sequence[str]] | Tensor, position: Mapping[str, int], device=None) -> Tensor:
    """Rankings given as names or as a position tensor, as a long ``[B, L]`` tensor of positions."""
    if isinstance(ranked, Tensor):
        out = ranked.to(device=device, dtype=torch.long)
        if out.dim() != 2:
            raise ValueError(f"ranked positions must be [B, L], got shape {tuple(out.shape)}")
        if out.numel() and (int(out.max()) >= len(position) or int(out.min()) < -1):
            raise ValueError(
                f"ranked positions must lie in [-1, {len(position)}), got {int(out.min())}..{int(out.max())}"
            )
        return out
    try:
        return lookup_positions([list(row) for row in ranked], position, device)
    except ValueError as err:
        raise ValueError(f"a ranking names an image outside the gallery: {err}") from None
