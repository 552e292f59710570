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

Search is exact. With FAISS installed (``pip install coalign[faiss]``) an ``IndexFlatIP`` over all K vectors of
every image finds the candidates, which the model then re-scores; otherwise the chunked torch top-k shared with
evaluation (:func:`coalign.evaluation.topk.chunked_topk`) over ``model.similarity`` does it. Both give the
model's global scores (the local head's re-ranking needs local tokens, which an index does not store).
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

from ._search import IMAGE_EXTENSIONS, ImageFiles, collate_images, draw_results, faiss_search, list_images, load_faiss
from .evaluation.cache import model_fingerprint
from .evaluation.topk import chunked_topk
from .heads.base import GlobalHead
from .io import atomic_path, atomic_write_json, load_image, read_json

__all__ = ["Index", "draw_results", "list_images", "model_identity", "IMAGE_EXTENSIONS"]

FORMAT = "coalign-index"
VERSION = 1


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
        self._faiss_index = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"Index({len(self)} images of {self.root}, model {self.model_name!r}, dir {self.directory})"

    @property
    def model_name(self) -> str | None:
        """The name the index's model was given at build time (a registered name, folder or Hub id)."""
        return self.info["model"].get("name")

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
        """
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
        elif out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no coalign index; choose a new or empty folder")
        for stale in (out / "shards").glob(".*tmp*"):  # half-written shards of a killed run
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
        # FAISS finds candidates by inner product: valid when the head scores by the max inner product
        max_dot = type(model.global_head).similarity is GlobalHead.similarity
        faiss = load_faiss() if backend != "torch" else None
        if backend == "faiss" and (faiss is None or not max_dot):
            raise ValueError("backend 'faiss' needs faiss installed and a head scoring by inner product")
        if faiss is None or not max_dot or (backend == "auto" and query.device.type != "cpu"):
            return chunked_topk(query, self.embeddings, k, similarity=model.similarity)
        if self._faiss_index is None:
            n, vectors, dim = self.embeddings.shape
            self._faiss_index = faiss.IndexFlatIP(dim)
            self._faiss_index.add(self.embeddings.reshape(n * vectors, dim).float().contiguous().numpy())
        return faiss_search(self._faiss_index, self.embeddings, query, k, model.similarity)


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
