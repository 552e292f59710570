"""Search one's own images: encode a folder once into an on-disk index, then query it by image + text.

An index folder holds::

    index.json                  format, the model that made it (name, fingerprint, config), the image folder,
                                dimensions, counts and the images that could not be read
    paths.json                  the indexed images, relative to the folder, in row order
    shards/00000.safetensors    ``embedding [n, K, E]`` of n images; the shard's metadata names its images

Building is resumable. Each shard is written atomically (:func:`coalign.io.atomic_path`), so a killed run
leaves only whole shards; running the same build again encodes just the images no shard covers (and any image
added to the folder since). ``index.json`` is marked complete only at the end, and :meth:`Index.load` refuses an
unfinished index. Images deleted from the folder stay in the index until it is rebuilt (``overwrite=True``).

Search is exact by default: :func:`coalign.evaluation.topk.chunked_topk`, the top-k shared with evaluation, runs
``faiss.knn`` over the stored embeddings in place when FAISS is installed and images have one vector each (``pip
install coalign[faiss]``; nothing to build or save: the embeddings are the index, so there is no FAISS file to
keep in step), and its blocked torch GEMM otherwise (K > 1 vectors: the max over them is one pass, faster than
FAISS's large-k search); both give the model's global scores in the same order (ties: the lower row first). A
head that scores otherwise gets ``model.similarity`` block by block. The local head's re-ranking needs local
tokens, which an index does not store.

For collections beyond a few million vectors, ``Index.build(..., approximate="hnsw" | "ivfpq")`` (``coalign
index --approximate``) also builds a FAISS HNSW or IVF-PQ index over all K vectors of every image and saves it as
``faiss.index`` beside the shards (written atomically); ``index.json`` records its kind, parameters
(:data:`coalign._search.APPROXIMATE`), vector count, width and a fingerprint of the embeddings. A search loads it
with ``faiss.read_index`` and takes its candidates, which it re-scores exactly; a FAISS index that no longer
matches the embeddings (or cannot be read) is rebuilt with a warning, never used.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._search import (
    APPROXIMATE,
    IMAGE_EXTENSIONS,
    ImageFiles,
    approximate_candidates,
    approximate_parameters,
    build_approximate,
    collate_images,
    draw_results,
    embeddings_fingerprint,
    list_images,
    load_faiss,
    read_faiss_index,
    write_faiss_index,
)
from .evaluation.cache import model_fingerprint
from .evaluation.topk import candidate_topk, chunked_topk, scoring_function
from .io import atomic_path, atomic_write_json, load_image, read_json

__all__ = ["Index", "draw_results", "list_images", "model_identity", "IMAGE_EXTENSIONS", "APPROXIMATE"]

FORMAT = "coalign-index"
VERSION = 1
FAISS_FILE = "faiss.index"


def model_identity(model, name: str | None = None) -> dict[str, Any]:
    """What an index records about its model: a name to reload it by, a weights fingerprint and the config."""
    return {
        "name": name or getattr(model, "card_info", {}).get("name"),
        "fingerprint": model_fingerprint(model, model.preprocess),
        "config": model.config(),
    }


class Index:
    """Embeddings of a folder of images, searchable by reference image + modification text.

    Build one with :meth:`build` (or ``coalign index``), open it with :meth:`load`, query it with :meth:`search`.

    Example:
        >>> index = Index.build(model, "photos/", "photos.index")
        >>> index.search(model, "photos/red_dress.jpg", "the same dress in blue", k=5)
        [('/home/me/photos/blue_dress.jpg', 0.83), ...]

    Attributes:
        directory: the index folder.
        root: the image folder the paths are relative to.
        paths: indexed images (relative), row i of ``embeddings`` belongs to ``paths[i]``.
        embeddings: ``[N, K, E]`` global target embeddings (CPU).
        info: the contents of ``index.json`` (model identity, counts, skipped images).
    """

    def __init__(self, directory: Path, root: Path, paths: list[str], embeddings: Tensor, info: dict[str, Any]):
        if len(paths) != embeddings.shape[0]:
            raise ValueError(f"index has {len(paths)} paths but {embeddings.shape[0]} embedding rows")
        self.directory, self.root, self.paths, self.embeddings, self.info = directory, root, paths, embeddings, info
        self._approximate_index = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"Index({len(self)} images of {self.root}, model {self.model_name!r}, dir {self.directory})"

    @property
    def model_name(self) -> str | None:
        """The name the index's model was given at build time (a registered name, folder or Hub id)."""
        return self.info["model"].get("name")

    @property
    def approximate(self) -> dict[str, Any] | None:
        """The approximate FAISS index recorded in ``index.json`` (kind, parameters, counts, fingerprint), or None."""
        return self.info.get("approximate")

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Images that could not be read at build time: ``{"path", "error"}``."""
        return self.info.get("skipped", [])

    # -- building ----------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        folder: str | Path,
        output_dir: str | Path,
        *,
        model_name: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shard_size: int = 1024,
        dtype: torch.dtype = torch.float32,
        overwrite: bool = False,
        progress: bool = True,
        approximate: str | None = None,
        approximate_params: dict[str, Any] | None = None,
    ) -> Index:
        """Encode every image under ``folder`` with ``model.encode_targets`` into ``output_dir``.

        Running it again on the same folder and output resumes an interrupted build and adds new images.
        Unreadable images are skipped with a warning and listed in ``index.json``.

        Args:
            model: a ``CoAlign`` (on the device to encode with).
            folder: the image folder (searched recursively).
            output_dir: the index folder (created; a folder holding another index needs ``overwrite``).
            model_name: how to reload the model (registered name, folder or Hub id), recorded so that
                ``coalign search`` can load it; default: the model card's name.
            batch_size: images per forward pass.
            num_workers: image loading processes.
            shard_size: images per shard file (the work a killed run can lose).
            dtype: storage dtype (``torch.float16`` halves the index).
            overwrite: discard an index already in ``output_dir`` (built by another model or folder).
            progress: show a progress bar.
            approximate: also build an approximate FAISS index, ``"hnsw"`` or ``"ivfpq"`` (see
                :meth:`build_approximate`); None: exact search only (an approximate index built before is removed).
            approximate_params: its parameters, overriding :data:`coalign._search.APPROXIMATE`.
        """
        if approximate is not None:
            if scoring_function(model) is not None:
                raise ValueError("an approximate index needs a global head that scores by inner product")
            if load_faiss() is None:
                raise ValueError("an approximate index needs faiss: pip install coalign[faiss]")
            approximate_parameters(approximate, 1 << 62, 8, approximate_params)  # a bad name fails before encoding
        if batch_size < 1 or shard_size < 1:
            raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
        root, out = Path(folder).resolve(), Path(output_dir)
        paths = list_images(root, exclude=out)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
        identity = model_identity(model, model_name)
        shards_dir = out / "shards"
        cls._prepare(out, root, identity, overwrite)
        info = {"format": FORMAT, "version": VERSION, "complete": False, "root": str(root), "model": identity}
        shards_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "index.json", info)
        done = {int(p.stem): p for p in shards_dir.glob("*.safetensors") if p.stem.isdigit()}
        covered = set()
        for shard in done.values():
            covered.update(_shard_meta(shard)["covers"])
        todo = [p for p in paths if p not in covered]
        next_shard = max(done, default=-1) + 1
        was_training = model.training
        model.eval()
        try:
            # batches never straddle two shards, so each shard is flushed as soon as its last batch is encoded
            shards = [range(s, min(s + shard_size, len(todo))) for s in range(0, len(todo), shard_size)]
            batches = [list(r[i : i + batch_size]) for r in shards for i in range(0, len(r), batch_size)]
            loader = DataLoader(
                ImageFiles(root, todo, model.preprocess),
                batch_sampler=batches,
                num_workers=num_workers,
                collate_fn=collate_images,
            )
            pending: dict[str, list] = {"paths": [], "embeddings": [], "errors": []}
            bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress or not todo)
            shard_sizes = iter([len(r) for r in shards])
            size = next(shard_sizes, 0)
            for batch in loader:
                if batch["images"] is not None:
                    features = model.encode_targets(batch["images"].to(model.device))
                    pending["embeddings"].append(features.embedding.to("cpu", dtype))
                pending["paths"] += batch["paths"]
                pending["errors"] += batch["errors"]
                bar.update(len(batch["paths"]) + len(batch["errors"]))
                if len(pending["paths"]) + len(pending["errors"]) == size:
                    _write_shard(shards_dir / f"{next_shard:05d}.safetensors", pending)
                    next_shard, size = next_shard + 1, next(shard_sizes, 0)
                    pending = {"paths": [], "embeddings": [], "errors": []}
            bar.close()
        finally:
            model.train(was_training)
        index = cls._finish(out, info)
        if approximate is not None:
            index.build_approximate(approximate, approximate_params)
        else:
            (out / FAISS_FILE).unlink(missing_ok=True)  # an exact index: an approximate one built before is gone
        if index.skipped:
            first = "; ".join(f"{s['path']} ({s['error']})" for s in index.skipped[:3])
            warnings.warn(f"skipped {len(index.skipped)} unreadable image(s), e.g. {first}", stacklevel=2)
        return index

    @staticmethod
    def _prepare(out: Path, root: Path, identity: dict[str, Any], overwrite: bool) -> None:
        """Check that ``out`` is empty, new, or an index of the same model and folder (else refuse or wipe)."""
        manifest = out / "index.json"
        if manifest.is_file():
            old = read_json(manifest, what="index.json")
            problem = None
            if old.get("model", {}).get("fingerprint") != identity["fingerprint"]:
                problem = f"was built by another model ({old.get('model', {}).get('name')!r})"
            elif old.get("root") != str(root):
                problem = f"was built from another folder ({old.get('root')})"
            if problem and not overwrite:
                raise ValueError(
                    f"the index in {out} {problem}; pass overwrite=True (--overwrite true) or a new output"
                )
            if problem or overwrite:
                for shard in (out / "shards").glob("*.safetensors"):
                    shard.unlink()
                (out / "paths.json").unlink(missing_ok=True)
            (out / FAISS_FILE).unlink(missing_ok=True)  # it described the old rows; a build makes a new one
        elif out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no coalign index; choose a new or empty folder")
        # half-written shards or FAISS index of a killed run
        for stale in [*(out / "shards").glob(".*tmp*"), *out.glob(f".tmp-{FAISS_FILE}.*")]:
            stale.unlink()

    @classmethod
    def _finish(cls, out: Path, info: dict[str, Any]) -> Index:
        shards = sorted((p for p in (out / "shards").glob("*.safetensors") if p.stem.isdigit()), key=lambda p: p.stem)
        paths, skipped = [], []
        for shard in shards:
            meta = _shard_meta(shard)
            paths += meta["paths"]
            skipped += [{"path": p, "error": e} for p, e in meta["errors"]]
        shape, dtype = None, None
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                if "embedding" in f.keys():
                    shape, dtype = f.get_slice("embedding").get_shape(), f.get_slice("embedding").get_dtype()
                    break
        info = dict(info)
        info.update(
            complete=True,
            num_images=len(paths),
            vectors_per_image=shape[1] if shape else None,
            embedding_dim=shape[2] if shape else None,
            storage_dtype=dtype,
            skipped=skipped,
            shards=[p.name for p in shards],
        )
        atomic_write_json(out / "paths.json", paths, indent=None)
        atomic_write_json(out / "index.json", info)
        return cls.load(out)

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> Index:
        """Open an index folder written by :meth:`build`."""
        directory = Path(directory)
        manifest = directory / "index.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{directory} is not a coalign index (no index.json); build one with coalign index")
        info = read_json(manifest, what="index.json")
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"{manifest} is not a coalign index file")
        if not info.get("complete"):
            raise ValueError(
                f"the index in {directory} is unfinished (its build was interrupted): run the same `coalign index` "
                "command again to finish it"
            )
        _check_manifest(info, manifest)
        paths = read_json(directory / "paths.json", what="the index's paths.json")
        parts = []
        for name in info["shards"]:
            shard = directory / "shards" / name
            try:
                with safe_open(str(shard), framework="pt") as f:
                    if "embedding" in f.keys():
                        parts.append(f.get_tensor("embedding"))
            except Exception as err:  # safetensors' errors for a missing or corrupt shard name no file
                raise ValueError(
                    f"index shard {shard} is missing or corrupt ({type(err).__name__}: {err}); rebuild the index with "
                    "`coalign index ... --overwrite true`"
                ) from None
        if not parts:
            raise ValueError(f"the index in {directory} holds no readable image (all {len(info['skipped'])} skipped)")
        embeddings = torch.cat(parts)
        if not isinstance(paths, list) or len(paths) != len(embeddings):
            raise ValueError(
                f"{directory / 'paths.json'} does not match the shards ({len(embeddings)} embeddings); rebuild the "
                "index with `coalign index ... --overwrite true`"
            )
        return cls(directory, Path(info["root"]), paths, embeddings, info)

    # -- searching ---------------------------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise if ``model`` is not the model that built this index (its embeddings would be meaningless)."""
        identity = model_identity(model)
        if identity["fingerprint"] != self.info["model"]["fingerprint"]:
            built = self.model_name or "an unnamed model"
            raise ValueError(
                f"this index was built by another model ({built!r}, fingerprint "
                f"{self.info['model']['fingerprint'][:12]}; yours: {identity['fingerprint'][:12]}): search with "
                f"the model that built it, or rebuild the index with `coalign index --model ... --overwrite true`"
            )

    @torch.no_grad()
    def search(
        self,
        model,
        image: str | Path | Image.Image,
        text: str,
        k: int = 10,
        backend: str = "auto",
        exclude_query: bool = True,
    ) -> list[tuple[str, float]]:
        """The k indexed images that best match a reference image modified by ``text``.

        Args:
            model: the model that built the index (checked).
            image: the reference image (a path or a PIL image).
            text: the modification text.
            k: number of results.
            backend: ``"faiss"``, ``"torch"`` or ``"auto"`` (FAISS when installed and the model runs on the CPU).
            exclude_query: drop the query image itself when it is in the index.

        Returns:
            ``[(image path, score), ...]``, best first.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.check_model(model)
        reference = image if isinstance(image, Image.Image) else load_image(image)
        was_training = model.training
        model.eval()
        try:
            query = model.encode_queries([reference], [text]).embedding
        finally:
            model.train(was_training)
        extra = 1 if exclude_query and not isinstance(image, Image.Image) else 0
        scores, index = self._top(model, query, k + extra, backend)
        results = [(str(self.root / self.paths[i]), float(s)) for i, s in zip(index[0].tolist(), scores[0].tolist())]
        if extra:
            own = str(Path(image).resolve())
            results = [r for r in results if str(Path(r[0]).resolve()) != own]
        return results[:k]

    def _top(self, model, query: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        similarity = scoring_function(model)
        if backend == "auto" and self.approximate is not None and similarity is None:
            return self.search_approximate(query, k)
        if backend == "faiss" and similarity is not None:
            raise ValueError("backend 'faiss' needs a global head scoring by inner product")
        if backend == "auto" and query.device.type != "cpu":
            backend = "torch"  # the model runs on an accelerator: score there
        return chunked_topk(query, self.embeddings, k, similarity=similarity, backend=backend)

    # -- the approximate index ---------------------------------------------------------------------------------
    def build_approximate(self, kind: str, params: dict[str, Any] | None = None) -> None:
        """Build an approximate FAISS index over all K vectors of every image, save it and record it.

        Args:
            kind: ``"hnsw"`` or ``"ivfpq"``; :data:`coalign._search.APPROXIMATE` documents both and their
                parameters.
            params: overrides of the default parameters, e.g. ``{"M": 48}`` or ``{"nlist": 4096, "nprobe": 64}``.
        """
        faiss = load_faiss()
        if faiss is None:
            raise ValueError("an approximate index needs faiss: pip install coalign[faiss]")
        n, vectors, dim = self.embeddings.shape
        resolved = approximate_parameters(kind, n * vectors, dim, params)
        built = build_approximate(faiss, self.embeddings.reshape(n * vectors, dim), kind, resolved)
        write_faiss_index(faiss, built, self.directory / FAISS_FILE)
        self.info["approximate"] = {
            "kind": kind,
            "params": resolved,
            "file": FAISS_FILE,
            "vectors": n * vectors,
            "dim": dim,
            "fingerprint": embeddings_fingerprint(self.embeddings, self.paths),
            "faiss_version": faiss.__version__,
        }
        atomic_write_json(self.directory / "index.json", self.info)
        self._approximate_index = built

    def _load_approximate(self):
        """The saved FAISS index, checked against the embeddings; rebuilt (with a warning) when it is stale."""
        if self._approximate_index is not None:
            return self._approximate_index
        record, faiss = self.approximate, load_faiss()
        if faiss is None:
            raise ValueError(
                f"the index in {self.directory} was built with --approximate {record['kind']}, which needs faiss: "
                "pip install coalign[faiss] (or search with backend='torch' for an exact search)"
            )
        n, vectors, dim = self.embeddings.shape
        problem = None
        if record.get("vectors") != n * vectors or record.get("dim") != dim:
            problem = f"it holds {record.get('vectors')} vectors of width {record.get('dim')}, not {n * vectors}x{dim}"
        elif record.get("fingerprint") != embeddings_fingerprint(self.embeddings, self.paths):
            problem = "the embeddings changed since it was built"
        else:
            try:
                loaded = read_faiss_index(faiss, self.directory / record.get("file", FAISS_FILE))
            except ValueError as err:
                problem = str(err)
            else:
                if loaded.ntotal != n * vectors or loaded.d != dim:
                    problem = f"the file holds {loaded.ntotal} vectors of width {loaded.d}, not {n * vectors}x{dim}"
                else:
                    self._approximate_index = loaded
                    return loaded
        warnings.warn(
            f"the approximate FAISS index of {self.directory} is stale ({problem}): rebuilding it", stacklevel=3
        )
        self.build_approximate(record["kind"], record.get("params"))
        return self._approximate_index

    @torch.no_grad()
    def search_approximate(self, queries: Tensor, k: int, candidates: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-k images by the approximate index: its best vectors, grouped by image and re-scored exactly.

        Args:
            queries: ``[Q, E]`` query embeddings.
            k: results per query.
            candidates: images to re-score exactly per query (default ``max(rerank * k, k + 16)``, ``rerank``
                from the index's parameters); more is slower and closer to exact.

        Returns:
            ``(scores [Q, k'], rows [Q, k'])`` like :func:`coalign.evaluation.topk.chunked_topk`.
        """
        index = self._load_approximate()
        record, vectors = self.approximate, self.embeddings.shape[1]
        wanted = candidates or max(int(record["params"].get("rerank", 4)) * k, k + 16)
        faiss = load_faiss()
        found = approximate_candidates(faiss, index, record["kind"], record["params"], queries, wanted * vectors)
        rows = torch.where(found >= 0, found // vectors, found)
        top = candidate_topk(queries.float(), self.embeddings, rows, k)
        return top.values.to(queries.device), top.indices.to(queries.device)


def _check_manifest(info: dict[str, Any], manifest: Path) -> None:
    """Refuse an ``index.json`` whose fields have the wrong shape, naming the field (not a KeyError later)."""
    expected = {"root": str, "shards": list, "skipped": list, "model": dict}
    for key, kind in expected.items():
        if not isinstance(info.get(key), kind):
            raise ValueError(f"{manifest}: {key!r} should be a {kind.__name__}, got {info.get(key)!r:.80}")
    if not isinstance(info["model"].get("fingerprint"), str):
        raise ValueError(f"{manifest}: model.fingerprint is missing; rebuild the index")
    if not all(isinstance(name, str) and "/" not in name and name not in ("", ".", "..") for name in info["shards"]):
        raise ValueError(f"{manifest}: 'shards' must list file names inside shards/")


def _write_shard(path: Path, pending: dict[str, list]) -> None:
    """One shard, written whole or not at all (:func:`coalign.io.atomic_path`)."""
    tensors = {"embedding": torch.cat(pending["embeddings"]).contiguous()} if pending["embeddings"] else {}
    meta = {"paths": json.dumps(pending["paths"]), "errors": json.dumps(pending["errors"])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _shard_meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    paths, errors = json.loads(meta.get("paths", "[]")), [tuple(e) for e in json.loads(meta.get("errors", "[]"))]
    return {"paths": paths, "errors": errors, "covers": paths + [p for p, _ in errors]}
