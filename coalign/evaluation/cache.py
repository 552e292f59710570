"""On-disk cache of encoded galleries (safetensors only: loading a cache never runs code).

A cache file is keyed by the model (architecture, configuration and a fingerprint of its weights), its image
preprocessing, the gallery (ids and image paths) and the storage dtype. Any change gives a new key, so a
stale file is never read; CIRCO's val and test share one gallery and therefore one file.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._features import TargetFeatures
from ..io import atomic_path
from .engine import Gallery, encode_gallery

__all__ = ["model_fingerprint", "gallery_fingerprint", "cache_key", "load_gallery", "save_gallery", "cached_gallery"]

_SAMPLES = 1024  # values hashed per weight tensor: enough to tell checkpoints apart, cheap for a 1B model


def _describe(obj: Any) -> Any:
    config = getattr(obj, "config", None)
    if callable(config):
        return config()
    return repr(obj)


@torch.no_grad()
def model_fingerprint(model, transform=None) -> str:
    """SHA-256 over the model class, its hyperparameters, sampled weight values and the image transform."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    hparams = getattr(model, "hparams", None)
    if hparams:
        text = json.dumps(dict(hparams), sort_keys=True, default=repr)
        h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", text).encode())  # object addresses change every run
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            m = min(flat.numel(), _SAMPLES)  # evenly spaced, in integers (float linspace overshoots on big tensors)
            picks = torch.arange(m, device=flat.device) * (flat.numel() - 1) // max(m - 1, 1)
            h.update(flat[picks].double().cpu().numpy().tobytes())
    if transform is not None:
        h.update(json.dumps(_describe(transform), sort_keys=True, default=repr).encode())
    return h.hexdigest()


def gallery_fingerprint(entries: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over a gallery's ``(image_id, path)`` pairs, in order."""
    h = hashlib.sha256()
    for image_id, path in entries:
        h.update(f"{image_id}\t{Path(path).resolve()}\n".encode())
    return h.hexdigest()


def cache_key(model_fp: str, gallery_fp: str, dtype: torch.dtype | None) -> str:
    return hashlib.sha256(f"{model_fp}|{gallery_fp}|{dtype}".encode()).hexdigest()


def save_gallery(path: Path, gallery: Gallery, key: str) -> None:
    """Write ``gallery`` to ``path`` atomically (a crash leaves no half-written cache behind)."""
    tensors = {"embedding": gallery.features.embedding.contiguous(), "tokens": gallery.features.tokens.contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "ids": json.dumps(gallery.ids)})


def load_gallery(path: Path, key: str, ids: Sequence[str] | None = None) -> Gallery | None:
    """Read a cached gallery, or None when the file is absent, unreadable (with a warning: it is then rewritten)
    or was written for another key or id list."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            cached_ids = json.loads(meta["ids"])
            if ids is not None and list(ids) != cached_ids:
                return None
            features = TargetFeatures(f.get_tensor("embedding"), f.get_tensor("tokens"))
        return Gallery(cached_ids, features)
    except Exception as err:  # a truncated or corrupt cache file: a cache miss, never a blocker
        warnings.warn(
            f"ignoring the corrupt gallery cache {path} ({type(err).__name__}: {err}); re-encoding", stacklevel=2
        )
        return None


def cached_gallery(
    model,
    loader,
    cache_dir: str | Path | None,
    entries: Sequence[tuple[str, Any]],
    name: str = "gallery",
    dtype: torch.dtype | None = None,
    transform=None,
    progress: bool = True,
) -> tuple[Gallery, Path | None, bool]:
    """Encode a gallery, reading and writing ``cache_dir`` when given.

    Args:
        model: the encoder.
        loader: the gallery loader (used only on a cache miss).
        cache_dir: folder of cache files; None disables caching.
        entries: the gallery's ``(image_id, path)`` pairs (part of the key).
        name: readable prefix of the file name (e.g. ``"cirr-val"``).
        dtype: storage dtype of the features; None keeps the model's.
        transform: the image transform used by the loader (part of the key).
        progress: show a progress bar while encoding.

    Returns:
        ``(gallery, cache file or None, whether it was read from the cache)``.
    """
    if cache_dir is None:
        return encode_gallery(model, loader, progress=progress, dtype=dtype), None, False
    key = cache_key(model_fingerprint(model, transform), gallery_fingerprint(entries), dtype)
    path = Path(cache_dir).expanduser() / f"{name}-{key[:20]}.safetensors"
    ids = [str(i) for i, _ in entries]
    gallery = load_gallery(path, key, ids)
    if gallery is not None:
        return gallery, path, True
    gallery = encode_gallery(model, loader, progress=progress, dtype=dtype)
    save_gallery(path, gallery, key)
    return gallery, path, False
