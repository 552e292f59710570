"""A disk cache of a frozen image encoder's outputs, so training computes them once per image.

With BLIP-2 the frozen EVA ViT-g is most of a training step's compute, yet its output for a given image never
changes. :class:`FeatureCache` stores those outputs ("stem features") per image and hands them back on later
epochs; ``CoAlign(feature_cache=DIR)`` uses it for the frozen stem of its backbone
(:meth:`coalign.backbones.base.Backbone.image_stem_modules`) and trains the rest from it.

Keys and namespaces:

* An image's key is a 16-byte BLAKE2b digest of the exact tensor the stem would see (its dtype, shape and bytes),
  so no dataset change is needed: a deterministic transform gives the same key every epoch, any other input a new
  one. The cache refuses training data whose images change between epochs (random augmentation): an image id
  (``reference_id`` / ``target_id``) seen again with different pixels is an error.
* A cache folder ``DIR/<fingerprint>/`` belongs to one set of frozen weights: the fingerprint hashes every
  parameter and buffer of the stem (names, dtypes, shapes, bytes) together with the backbone class, its image
  transform and the autocast setting. A cache made with other weights lives in another folder and is never read.

Layout of ``DIR/<fingerprint>/``::

    meta.json                               format, fingerprint, feature shape and what the fingerprint covers
    r<rank>-<run token>-<n>.safetensors     a shard: "keys" uint8 [N, 16] and "features" float16 [N, *shape]

Shards are written whole with :func:`coalign.io.atomic_path`: a process killed mid-write leaves the complete
shards (and at worst a ``.tmp-*`` file nothing reads), so the next run resumes from them; features still in
memory are computed again. Every process (DDP rank) writes only its own shards and reads everyone's, so ranks
share one cache without locks; :meth:`FeatureCache.refresh` picks up shards other ranks wrote since. An image two
ranks computed at once is stored twice and read from the first shard found. Features are read by memory-mapping
the shards (``safetensors.safe_open``), one row per image.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .io import atomic_path, atomic_write_text

__all__ = ["FeatureCache", "pixel_keys", "weights_fingerprint"]

FORMAT = "coalign-feature-cache"
VERSION = 1
META_NAME = "meta.json"
KEY_BYTES = 16
#: features kept in memory before they are written as one shard
DEFAULT_SHARD_BYTES = 256 << 20
#: how many image ids the augmentation check remembers (16 bytes of digest each, plus the id)
MAX_TRACKED_IDS = 1_000_000
#: training batches of a later epoch without a single hit before the cache calls the images random
MISS_BATCHES = 4


def pixel_keys(pixels: Tensor) -> list[bytes]:
    """One 16-byte key per image of ``pixels [B, ...]``: BLAKE2b of its dtype, shape and bytes."""
    if pixels.dim() < 2 or pixels.shape[0] == 0:
        raise ValueError(f"pixel_keys expects a batch [B, ...] with B >= 1, got shape {tuple(pixels.shape)}")
    rows = pixels.detach().to("cpu").contiguous()
    header = f"{rows.dtype}|{tuple(rows.shape[1:])}|".encode()
    # bytes through a uint8 view: numpy has no bfloat16
    flat = rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy()
    keys = []
    for row in flat:
        digest = hashlib.blake2b(header, digest_size=KEY_BYTES)
        digest.update(row)  # the buffer itself, no copy
        keys.append(digest.digest())
    return keys


def weights_fingerprint(modules: Mapping[str, nn.Module], extra: Mapping[str, Any]) -> str:
    """A hex digest of the modules' parameters and buffers (names, dtypes, shapes, bytes) and the JSON ``extra``.

    Tensors are hashed one at a time (copied to the CPU one at a time), so a 1B-parameter encoder on a GPU needs
    no second copy of itself in host memory.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for prefix, module in sorted(modules.items()):
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        for name, tensor in sorted(tensors, key=lambda item: item[0]):
            if tensor.device.type == "meta":
                raise ValueError(f"cannot fingerprint {prefix}.{name}: it is on the meta device (no weights)")
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}.{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class FeatureCache:
    """Stem features of images on disk, keyed by :func:`pixel_keys`, for one fingerprint of frozen weights.

    Args:
        root: the cache folder given by the user (``feature_cache=``); this cache lives in ``root/<fingerprint>``.
        fingerprint: :func:`weights_fingerprint` of the frozen stem.
        description: what the fingerprint covers, written to ``meta.json`` for people reading the folder.
        rank: this process's rank (its shards are named after it).
        shard_bytes: features held in memory before a shard is written.

    Raises:
        ValueError: ``root`` is a file, or ``meta.json`` of this fingerprint is not a coalign feature cache.
    """

    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        description: Mapping[str, Any] | None = None,
        rank: int = 0,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"feature_cache {root} is a file; give a folder (it is created if missing)")
        self.folder = root / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.description = dict(description or {})
        self.rank = int(rank)
        self.shard_bytes = int(shard_bytes)
        self._token = secrets.token_hex(4)  # two runs with the same rank never write the same shard name
        self._written = 0
        self.shape: tuple[int, ...] | None = None
        self._index: dict[bytes, tuple[int, int]] = {}  # key -> (shard number, row)
        self._shards: list[Path] = []
        self._known: set[str] = set()
        self._pending_keys: list[bytes] = []
        self._pending: list[Tensor] = []
        self._pending_at: dict[bytes, int] = {}
        self._ids: dict[str, bytes] = {}
        #: images served from the cache / computed, since construction
        self.hits = 0
        self.misses = 0
        self._read_meta()
        self.refresh()

    # -- folder ------------------------------------------------------------------------------------------------
    def _read_meta(self) -> None:
        path = self.folder / META_NAME
        if not path.is_file():
            return
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not readable JSON ({err}); delete the folder to rebuild the cache") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path} is not a coalign feature cache of fingerprint {self.fingerprint}")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} has cache format version {meta.get('version')}, this coalign reads {VERSION}")
        self.shape = tuple(meta["shape"]) if meta.get("shape") else None

    def _write_meta(self) -> None:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "shape": list(self.shape or ()),
            "dtype": "float16",
            "covers": self.description,
        }
        path = self.folder / META_NAME
        if not path.is_file():  # every rank writes the same content; atomic, so a race is harmless
            atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True))

    def refresh(self) -> int:
        """Index the shards written since the last look (by other ranks or runs); returns how many were added."""
        added = 0
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name in self._known or path.name.startswith("."):
                continue
            self._known.add(path.name)
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = f.get_tensor("keys")
                    shape = tuple(f.get_slice("features").get_shape())
            except Exception as err:  # a shard damaged outside coalign's atomic writes: recompute, never trust it
                warnings.warn(f"feature cache: skipping unreadable shard {path} ({type(err).__name__})", stacklevel=2)
                continue
            if keys.dtype != torch.uint8 or keys.dim() != 2 or keys.shape[1] != KEY_BYTES or shape[0] != len(keys):
                warnings.warn(f"feature cache: skipping shard {path}: its keys are not [N, {KEY_BYTES}]", stacklevel=2)
                continue
            if self.shape is not None and shape[1:] != self.shape:
                warnings.warn(
                    f"feature cache: skipping shard {path}: features {list(shape[1:])}, expected {list(self.shape)}",
                    stacklevel=2,
                )
                continue
            self.shape = shape[1:]
            number = len(self._shards)
            self._shards.append(path)
            for row, key in enumerate(keys.numpy()):
                self._index.setdefault(key.tobytes(), (number, row))
            added += 1
        return added

    def __len__(self) -> int:
        """Images whose features are on disk or waiting in memory."""
        return len(self._index) + sum(1 for k in self._pending_keys if k not in self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index or key in self._pending_at

    @property
    def shards(self) -> list[Path]:
        return list(self._shards)

    # -- reading and writing -----------------------------------------------------------------------------------
    def get(self, keys: Sequence[bytes]) -> dict[int, Tensor]:
        """``{position: float16 features}`` for the keys found (on disk or in memory), positions into ``keys``."""
        found: dict[int, Tensor] = {}
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            if key in self._pending_at:
                found[position] = self._pending[self._pending_at[key]]
            elif key in self._index:
                shard, row = self._index[key]
                by_shard.setdefault(shard, []).append((position, row))
        for shard, wanted in by_shard.items():
            with safe_open(str(self._shards[shard]), framework="pt") as f:
                features = f.get_slice("features")
                for position, row in wanted:
                    found[position] = features[row : row + 1][0]
        return found

    def put(self, keys: Sequence[bytes], features: Tensor) -> None:
        """Remember ``features [N, *shape]`` (stored as float16) under ``keys``; written out in shards."""
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} feature rows")
        shape = tuple(features.shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"features {list(shape)} do not match this cache's {list(self.shape)} ({self.folder})")
        half = features.detach().to("cpu", torch.float16)
        if not torch.isfinite(half).all():
            raise ValueError(
                "the frozen image encoder's outputs do not fit float16 (inf/nan after conversion); the feature "
                "cache stores float16, so train this model without feature_cache"
            )
        for key, row in zip(keys, half, strict=True):
            if key in self._index or key in self._pending_at:
                continue
            self._pending_at[key] = len(self._pending)
            self._pending_keys.append(key)
            self._pending.append(row.clone())
        row_bytes = half[0].numel() * 2 if len(half) else 0
        if row_bytes and len(self._pending) * row_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> Path | None:
        """Write the features waiting in memory as one shard (atomically); returns its path (None: nothing new)."""
        if not self._pending:
            return None
        self._write_meta()
        keys = torch.tensor([list(k) for k in self._pending_keys], dtype=torch.uint8)
        path = self.folder / f"r{self.rank:03d}-{self._token}-{self._written:06d}.safetensors"
        with atomic_path(path) as tmp:
            save_file(
                {"keys": keys, "features": torch.stack(self._pending)},
                str(tmp),
                metadata={"format": FORMAT, "fingerprint": self.fingerprint},
            )
        self._written += 1
        self._pending, self._pending_keys, self._pending_at = [], [], {}
        self._known.add(path.name)
        number = len(self._shards)
        self._shards.append(path)
        for row, key in enumerate(keys.numpy()):
            self._index.setdefault(key.tobytes(), (number, row))
        return path

    # -- the training path ---------------------------------------------------------------------------------------
    def check_ids(self, ids: Iterable[str], keys: Sequence[bytes]) -> None:
        """Refuse images that change between appearances: the same id with other pixels means random augmentation."""
        for image_id, key in zip(ids, keys):
            if not image_id:
                continue
            seen = self._ids.get(image_id)
            if seen is None:
                if len(self._ids) < MAX_TRACKED_IDS:
                    self._ids[image_id] = key
            elif seen != key:
                raise ValueError(
                    f"feature_cache: image {image_id!r} came with different pixels than before; the training "
                    "transform is random (augmentation), so its features cannot be cached. Train without "
                    "feature_cache, or without the random augmentation"
                )

    def features(
        self,
        pixels: Tensor,
        compute: Callable[[Tensor], Tensor],
        ids: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The stem features of ``pixels [B, ...]``: read when cached, else ``compute``d (no gradient) and stored.

        Computed and read features alike are rounded to float16 and returned in ``dtype`` (None: the pixels'
        dtype) on the pixels' device, so a step gives the same numbers whether its images were cached or not.

        Raises:
            ValueError: an id came with other pixels than before, or a later epoch found none of its images in the
                cache this process filled: the images are randomly augmented.
        """
        keys = pixel_keys(pixels)
        if ids is not None:
            self.check_ids(ids, keys)
        unique: dict[bytes, int] = {}
        for key in keys:
            unique.setdefault(key, len(unique))
        order = list(unique)
        found = self.get(order)
        missing = [i for i in range(len(order)) if i not in found]
        if missing:
            first = {key: position for position, key in reversed(list(enumerate(keys)))}
            rows = torch.tensor([first[order[i]] for i in missing], device=pixels.device)
            with torch.no_grad():
                computed = compute(pixels.index_select(0, rows))
            self.put([order[i] for i in missing], computed)
            half = computed.detach().to("cpu", torch.float16)
            for i, row in zip(missing, half, strict=True):
                found[i] = row
        self.hits += len(order) - len(missing)
        self.misses += len(missing)
        self._check_reuse(len(order) - len(missing))
        with torch.autocast("cpu", enabled=False):  # CPU autocast refuses to stack float16 tensors
            stacked = torch.stack([found[i] for i in range(len(order))])
            out = stacked.index_select(0, torch.tensor([unique[key] for key in keys]))
        return out.to(pixels.device, dtype or (pixels.dtype if pixels.is_floating_point() else torch.float32))

    def new_epoch(self) -> None:
        """Call at the start of every training epoch: writes what is pending, reads other ranks' shards and arms
        the check that a later epoch finds the images an earlier one stored."""
        self.flush()
        self.refresh()
        self._armed = self.misses > 0  # this process stored images in an earlier epoch
        self._epoch_batches = self._epoch_hits = 0

    _armed = False
    _epoch_batches = 0
    _epoch_hits = 0

    def _check_reuse(self, hits: int) -> None:
        self._epoch_batches += 1
        self._epoch_hits += hits
        if self._armed and self._epoch_batches >= MISS_BATCHES and self._epoch_hits == 0:
            raise ValueError(
                f"feature_cache: {self._epoch_batches} batches of this epoch found none of their images among the "
                f"{len(self)} cached by the epochs before; the training images differ every epoch (random "
                "augmentation?), so their features cannot be cached. Train without feature_cache"
            )
