"""The machinery of :mod:`coalign.index`: listing image files, loading them safely, FAISS search, pictures.

The exact torch top-k is :func:`coalign.evaluation.topk.chunked_topk`, shared with evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .io import load_image
from .viz import retrieval_grid

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "faiss_search",
    "load_faiss",
    "draw_results",
    "ImageFiles",
    "collate_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


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


def load_faiss():
    """The ``faiss`` module, or None when it is not installed."""
    try:
        import faiss  # an optional, heavy dependency: imported only when a search may use it
    except ImportError:
        return None
    return faiss


def faiss_search(faiss_index, embeddings: Tensor, query: Tensor, k: int, similarity) -> tuple[Tensor, Tensor]:
    """Exact top-k images from an ``IndexFlatIP`` over all K vectors of every image, re-scored by ``similarity``.

    The k best images (by their best vector) own at most k * K of the best vectors, so searching that many
    vectors finds all of them; ``similarity`` then gives the same scores as
    :func:`coalign.evaluation.topk.chunked_topk`.
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
