"""On-disk layout shared by every synthesis stage: item ids, shards, seeds and failure records.

Every output a stage produces is written atomically with :mod:`coalign.io` (a temporary file in the same folder,
then ``os.replace``): a process killed at any moment leaves either the complete file or no file. A stage
therefore knows an item is done exactly when its output file exists, and a rerun resumes without losing or
duplicating anything.
"""

from __future__ import annotations

import functools
import hashlib
import os
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from coalign.io import atomic_write_json, read_json

__all__ = [
    "item_id",
    "item_index",
    "shard_of",
    "derive_seed",
    "item_path",
    "existing_items",
    "record_failure",
    "clear_failure",
    "list_failures",
    "failed_indices",
]

ID_PREFIX = "q"
ID_DIGITS = 8  # up to 100M groups; ids sort in index order as plain strings


def item_id(index: int) -> str:
    """The id of group ``index``: ``q00000042``. Every artifact of the group is named after it."""
    return f"{ID_PREFIX}{index:0{ID_DIGITS}d}"


def item_index(item: str) -> int:
    """Inverse of :func:`item_id`."""
    return int(item[len(ID_PREFIX) :])


def shard_of(index: int, shard_size: int) -> int:
    """Items are sharded by id in contiguous blocks: a shard is both a unit of work and one folder on disk."""
    return index // shard_size


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (global seed, stage, item index, attempt).

    Python's ``hash`` is salted per process, so ranks and reruns would disagree; a cryptographic hash of the
    parts is stable everywhere and keeps the streams of neighbouring items independent.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def item_path(root: Path, index: int, shard_size: int, suffix: str = ".json") -> Path:
    """``root/<shard:05d>/<id><suffix>``: a few thousand files per folder at most, whatever the dataset size."""
    return _shard_dir(Path(root), shard_of(index, shard_size)) / f"{item_id(index)}{suffix}"


def existing_items(root: Path, indices: Iterable[int], shard_size: int, suffix: str = ".json") -> set[int]:
    """Which of ``indices`` have ``item_path(root, i, ...)`` on disk: one directory listing per shard, not one
    ``stat`` per item (which costs as much as a tiny model's work on a shared file system)."""
    by_shard: dict[int, list[int]] = {}
    for i in indices:
        by_shard.setdefault(shard_of(i, shard_size), []).append(i)
    found = set()
    for shard, members in by_shard.items():
        try:
            names = set(os.listdir(_shard_dir(Path(root), shard)))
        except FileNotFoundError:
            continue
        found.update(i for i in members if f"{item_id(i)}{suffix}" in names)
    return found


@functools.lru_cache(maxsize=4096)
def _shard_dir(root: Path, shard: int) -> Path:
    # pathlib parsing is a visible cost with tiny models (several paths per item and stage); cache the folders
    return root / f"{shard:05d}"


# -- failures --------------------------------------------------------------------------------------------------
def _failure_path(out: Path, stage: str, index: int, shard_size: int) -> Path:
    return item_path(out / "failures" / stage, index, shard_size)


def record_failure(out: Path, stage: str, index: int, shard_size: int, error: BaseException, rank: int) -> None:
    """Keep the traceback of an item whose model call raised; the item has no output, so the next run retries it."""
    previous = _failure_path(out, stage, index, shard_size)
    attempts = read_json(previous).get("attempts", 0) if previous.is_file() else 0
    atomic_write_json(
        previous,
        {
            "id": item_id(index),
            "stage": stage,
            "rank": rank,
            "attempts": attempts + 1,
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
        },
    )


def clear_failure(out: Path, stage: str, index: int, shard_size: int) -> None:
    _failure_path(out, stage, index, shard_size).unlink(missing_ok=True)


def list_failures(out: Path, stage: str) -> Iterator[dict[str, Any]]:
    """Failure records still on disk for ``stage`` (items that have not succeeded since)."""
    root = Path(out) / "failures" / stage
    if root.is_dir():
        for path in sorted(root.glob("*/*.json")):
            yield read_json(path)


def failed_indices(out: Path, stage: str) -> set[int]:
    """Indices with a failure record for ``stage``, from file names only."""
    root = Path(out) / "failures" / stage
    return {item_index(p.stem) for p in root.glob("*/*.json")} if root.is_dir() else set()
