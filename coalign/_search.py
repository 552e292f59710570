"""The machinery of :mod:`coalign.index`: listing image files, loading them safely, exact top-k, pictures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "exact_search",
    "faiss_search",
    "load_faiss",
    "draw_results",
    "ImageFiles",
    "collate_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: bytes the fp32 score block of one chunk of :func:`exact_search` may take
SCORE_BUDGET = 256 * 2**20


def list_images(folder: str | Path, exclude: str | Path | None = None) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), as sorted POSIX paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist or is not a folder")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        # prune hidden folders and the index itself when it was put inside the image folder
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((here / name).relative_to(folder).as_posix())
    return sorted(found)


@torch.no_grad()
def exact_search(
    queries: Tensor,
    embeddings: Tensor,
    k: int,
    similarity: Callable[[Tensor, Tensor], Tensor] | None = None,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k of every query over a database, one chunk of rows at a time (bounded memory).

    Args:
        queries: ``[Q, E]`` query embeddings; the search runs on their device.
        embeddings: ``[N, E]`` or ``[N, K, E]`` database (any device; moved chunk by chunk).
        k: results per query (capped at N).
        similarity: ``(queries, rows) -> [Q, rows]`` scores, e.g. ``model.similarity``; None: the inner product,
            maximised over the K vectors of a row.
        chunk_rows: rows per chunk; None keeps each score block under ``SCORE_BUDGET``.

    Returns:
        ``(scores [Q, k], indices [Q, k])``, best first.
    """
    n = embeddings.shape[0]
    k = min(k, n)
    vectors = 1 if embeddings.dim() == 2 else embeddings.shape[1]
    rows = chunk_rows or max(1024, SCORE_BUDGET // (4 * max(1, len(queries)) * vectors))
    best_scores = torch.empty((len(queries), 0), dtype=torch.float32, device=queries.device)
    best_index = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, n, rows):
        chunk = embeddings[start : start + rows].to(queries.device, queries.dtype)
        if similarity is not None:
            scores = similarity(queries, chunk)
        elif chunk.dim() == 2:
            scores = queries @ chunk.T  # plain GEMM: no pass over a size-1 K axis
        else:
            scores = torch.einsum("qe,nke->qnk", queries, chunk).amax(dim=-1)
        top = scores.float().topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_index = torch.cat([best_index, top.indices + start], dim=1)
        keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_index = keep.values, merged_index.gather(1, keep.indices)
    return best_scores, best_index


def load_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_search(faiss_index, embeddings: Tensor, query: Tensor, k: int, similarity) -> tuple[Tensor, Tensor]:
    """Exact top-k images from an ``IndexFlatIP`` over all K vectors of every image, re-scored by ``similarity``.

    The k best images (by their best vector) own at most k * K of the best vectors, so searching that many
    vectors finds all of them; ``similarity`` then gives the same scores as :func:`exact_search`.
    """
    n, vectors, _ = embeddings.shape
    _, hits = faiss_index.search(query.float().cpu().contiguous().numpy(), min(k * vectors, n * vectors))
    candidates = list(dict.fromkeys(int(h) // vectors for h in hits[0] if h >= 0))
    chosen = torch.tensor(candidates, dtype=torch.long)
    scores = similarity(query, embeddings[chosen].to(query.device, query.dtype)).float().cpu()
    top = scores.topk(min(k, len(candidates)), dim=1)
    return top.values, chosen[top.indices]


class ImageFiles(Dataset):
    """Loads and transforms one image per item; a file that cannot be read becomes an error record."""

    def __init__(self, root: Path, paths: list[str], transform):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .datamodules.base import load_image

        path = self.paths[i]
        try:
            return {"path": path, "image": self.transform(load_image(self.root / path))}
        except Exception as err:  # noqa: BLE001  any failure of one user file skips that file, never the run
            return {"path": path, "error": f"{type(err).__name__}: {err}"}


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "image" in it]
    return {
        "paths": [it["path"] for it in good],
        "images": torch.stack([it["image"] for it in good]) if good else None,
        "errors": [(it["path"], it["error"]) for it in items if "error" in it],
    }


def draw_results(
    image: str | Path | Image.Image, text: str, results: list[tuple[str, float]], path: str | Path | None = None
) -> Image.Image:
    """Draw the query (reference image and text) and its ranked results with their scores; save it to ``path``."""
    from .datamodules.base import load_image
    from .viz import retrieval_grid

    def picture(src) -> Image.Image:
        try:
            return src if isinstance(src, Image.Image) else load_image(src)
        except OSError:  # a file moved or deleted since indexing: draw a grey tile, keep the rest
            return Image.new("RGB", (64, 64), (200, 200, 200))

    row = {
        "reference": picture(image),
        "text": text,
        "results": [picture(p) for p, _ in results],
        "labels": [f"{s:.3f}" for _, s in results],
    }
    return retrieval_grid([row], path)
