"""The machinery of :mod:`coalign.index`: listing image files, loading them safely, approximate FAISS indexes
(build, persist, search, fingerprint), pictures.

Exact search is :func:`coalign.evaluation.topk.chunked_topk` (FAISS or torch), shared with evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .io import atomic_path, load_image
from .viz import retrieval_grid

__all__ = [
    "IMAGE_EXTENSIONS",
    "APPROXIMATE",
    "list_images",
    "load_faiss",
    "embeddings_fingerprint",
    "approximate_parameters",
    "build_approximate",
    "approximate_candidates",
    "write_faiss_index",
    "read_faiss_index",
    "draw_results",
    "ImageFiles",
    "collate_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: the approximate FAISS indexes ``coalign index --approximate`` builds, and their default parameters:
#:
#: - ``hnsw`` (``IndexHNSWFlat``, inner product): ``M`` graph links per vector (memory: ~ M * 8 bytes per vector
#:   on top of the vectors), ``efConstruction`` the build-time beam, ``efSearch`` the search-time beam (raised
#:   to the number of candidates a search asks for). Exact scores of the vectors it visits; no training.
#:   ``rerank``: images re-scored exactly per query, as a multiple of k.
#: - ``ivfpq`` (``IndexIVFPQ``, inner product): ``nlist`` k-means cells (None: 4 * sqrt(vectors), a power of
#:   two), ``nprobe`` cells visited per query, ``m`` product-quantizer sub-vectors of ``bits`` bits each (None:
#:   dim / 4, 64 bytes per 256-d vector), ``train_size`` vectors sampled for k-means. Compressed: its scores
#:   only shortlist, so ``rerank`` (a multiple of k, 20) candidates per query are re-scored exactly with the stored
#:   embeddings (as FAISS's ``IndexRefineFlat`` would).
APPROXIMATE: dict[str, dict[str, Any]] = {
    "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 128, "rerank": 4},
    "ivfpq": {"nlist": None, "nprobe": 32, "m": None, "bits": 8, "train_size": 262_144, "rerank": 20},
}


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


def embeddings_fingerprint(embeddings: Tensor, paths: list[str]) -> str:
    """A cheap fingerprint of an index's rows: shape, dtype, the paths in row order and up to 4,096 sampled rows.

    An approximate FAISS index records it when it is built; a different count, order or re-encoded image
    (another model, a resumed build that added images) changes it, so a stale FAISS index is never used.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(embeddings.shape)} {embeddings.dtype}".encode())
    digest.update(json.dumps(paths).encode())
    step = max(1, len(embeddings) // 4096)
    rows = embeddings[::step].contiguous()
    digest.update(rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b"")
    digest.update(embeddings[-1:].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def approximate_parameters(kind: str, vectors: int, dim: int, overrides: dict[str, Any] | None = None) -> dict:
    """The parameters of an approximate index (:data:`APPROXIMATE` documents them), defaults filled in.

    IVF-PQ's defaults scale with the collection: ``nlist`` = 4 * sqrt(vectors) rounded to a power of two
    (>= 16), ``m`` = dim / 4 sub-quantizers of 8 bits (so 64 bytes per 256-d vector).
    """
    if kind not in APPROXIMATE:
        raise ValueError(f"approximate must be one of {', '.join(APPROXIMATE)}, got {kind!r}")
    params = dict(APPROXIMATE[kind])
    unknown = set(overrides or {}) - set(params)
    if unknown:
        raise ValueError(f"unknown {kind} parameter(s) {sorted(unknown)}; known: {sorted(params)}")
    params.update({key: value for key, value in (overrides or {}).items() if value is not None})
    if kind == "ivfpq":
        if params["nlist"] is None:
            params["nlist"] = max(16, 2 ** round(math.log2(4 * math.sqrt(max(vectors, 1)))))
        if params["m"] is None:
            params["m"] = max(1, dim // 4)
        if dim % params["m"]:
            raise ValueError(f"ivfpq: m = {params['m']} sub-quantizers must divide the embedding width {dim}")
        needed = max(39 * params["nlist"], 2 ** params["bits"] * 39)
        if vectors < needed:
            raise ValueError(
                f"ivfpq with nlist {params['nlist']} needs at least {needed:,} vectors to train (FAISS's rule of 39 "
                f"per centroid), this index has {vectors:,}: search it exactly or with hnsw"
            )
    return params


def build_approximate(faiss, vectors: Tensor, kind: str, params: dict[str, Any], seed: int = 0):
    """A FAISS HNSW or IVF-PQ index (inner product) over ``vectors [Nv, E]``; ``params`` from
    :func:`approximate_parameters`."""
    data = vectors.to(torch.float32).contiguous().numpy()
    dim = data.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["efConstruction"])
        index.add(data)
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["bits"]),
                             faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    train = data
    limit = int(params["train_size"])
    if len(data) > limit:  # k-means on a seeded sample: training on every vector costs time and gains little
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        train = data[pick.numpy()]
    index.train(train)
    index.add(data)
    return index


def approximate_candidates(faiss, index, kind: str, params: dict[str, Any], queries: Tensor, m: int) -> Tensor:
    """``[Q, m]`` vector ids (-1 where fewer were found) of each query's m best by the approximate index."""
    m = max(1, min(m, index.ntotal))
    if kind == "hnsw":
        search = faiss.SearchParametersHNSW(efSearch=max(int(params["efSearch"]), m))
    else:
        search = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]))
    _, found = index.search(queries.to("cpu", torch.float32).contiguous().numpy(), m, params=search)
    return torch.from_numpy(found)


def write_faiss_index(faiss, index, path: Path) -> None:
    """``faiss.write_index``, whole or not at all (:func:`coalign.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_faiss_index(faiss, path: Path):
    """``faiss.read_index``; a missing or unreadable file raises ``ValueError`` naming it."""
    try:
        return faiss.read_index(str(path))
    except Exception as err:  # FAISS raises RuntimeError with a C++ trace for a missing or corrupt file
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read the FAISS index {path}: {reason[:200]}") from None


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
        "reference_id": Path(image).name if isinstance(image, (str, Path)) else None,
        "text": text,
        "results": [picture(p) for p, _ in results],
        "scores": [float(s) for _, s in results],
        "ids": [Path(p).name if isinstance(p, (str, Path)) else str(p) for p, _ in results],
    }
    return retrieval_grid([row], path, title=f"search: top {len(results)}")
