"""The assembled dataset in the Hugging Face Hub's format: parquet shards, one row per group, images embedded.

``OUT/data/<split>-<k>-of-<n>.parquet`` (5 digits each), the files ``datasets.load_dataset(OUT)`` and the Hub's
dataset viewer read (the card's ``configs:`` names them). **One row per group**, the paper's unit: no image is
stored twice (a 4-panel group gives up to 8 triplets, and the source is in 6 of them), and a streamed row is
self-contained. Columns (:func:`hub_features`):

=============  ================================  =============================================================
column         type                              meaning
=============  ================================  =============================================================
``group``      int64                             the group index (every triplet of the group shares it)
``id``         string                            the group id (``q00000042``)
``domain``     string                            the drawn domain
``edit_type``  string                            the drawn edit type
``panels``     list of ``Image``                 the kept panels, source first: PNG bytes, ``path`` = image id
``panel_ids``  list of string                    the image ids of ``panels`` (``reference_id`` / ``target_id``
                                                 of ``triplets.jsonl``)
``captions``   list of string                    the caption of each panel of ``panels``
``triplets``   list of struct                    ``id``, ``reference`` and ``target`` (positions in ``panels``),
                                                 ``text``, ``direction``; in ``triplets.jsonl``'s order
=============  ================================  =============================================================

**Deterministic**: the same rows give the same bytes (no timestamps; pyarrow's own writer settings), so a resumed
or distributed run gives bitwise the shards of an uninterrupted one. **Atomic**: each shard is written to a
temporary name and renamed, and shards of an earlier assemble that the new one does not name are removed after.
A shard whose rows (texts, and the path and size of every image) are unchanged is not rewritten: the key of its
rows is stored in the file's metadata. Shards are cut by the size of their images and texts, ``shard_mb`` each
at most (a group is never split), and row groups hold at most ~100 MB, as ``datasets`` writes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from coalign.io import atomic_path

__all__ = ["hub_features", "group_row", "write_parquet_shards", "shard_name", "HubRow"]

#: A row before its images are read: the panels are files (absolute paths), read when the shard is written.
HubRow = dict[str, Any]

#: Metadata key of the rows' content key in each shard (a rerun skips a shard whose key is unchanged).
_KEY = b"coalign_rows_key"
#: Most bytes of images and texts per row group (what ``datasets`` uses: ``config.MAX_ROW_GROUP_SIZE``).
_ROW_GROUP_BYTES = 100 * 2**20


def _datasets():
    # `datasets` (the `hub` extra) is needed only to write and read the parquet shards
    import datasets

    return datasets


def hub_features():
    """The ``datasets.Features`` of a row (see the module docstring); stored in every shard's schema metadata."""
    ds = _datasets()
    return ds.Features(
        {
            "group": ds.Value("int64"),
            "id": ds.Value("string"),
            "domain": ds.Value("string"),
            "edit_type": ds.Value("string"),
            "panels": [ds.Image()],
            "panel_ids": [ds.Value("string")],
            "captions": [ds.Value("string")],
            "triplets": [
                {
                    "id": ds.Value("string"),
                    "reference": ds.Value("int32"),
                    "target": ds.Value("int32"),
                    "text": ds.Value("string"),
                    "direction": ds.Value("string"),
                }
            ],
        }
    )


def group_row(
    group: dict[str, Any], panels: Sequence[int], files: Sequence[Path], ids: Sequence[str], triplets: Sequence[dict]
) -> HubRow:
    """The row of one kept group.

    Args:
        group: a line of ``prompts/groups.jsonl``.
        panels: the kept panel numbers (0 the source, ``k`` edit ``k - 1``), ascending.
        files: the image file of each kept panel (read when the shard is written).
        ids: the image id of each kept panel (as in ``triplets.jsonl``).
        triplets: the group's records of ``triplets.jsonl`` (:func:`.assemble.group_triplets`).
    """
    position = {panel_id: k for k, panel_id in enumerate(ids)}
    captions = {t["reference_id"]: t["reference_caption"] for t in triplets}
    captions.update({t["target_id"]: t["target_caption"] for t in triplets})
    return {
        "group": int(group["index"]),
        "id": group["id"],
        "domain": group["domain"],
        "edit_type": group["edit_type"],
        "panels": [str(f) for f in files],
        "panel_ids": list(ids),
        "captions": [captions[i] for i in ids],
        "triplets": [
            {
                "id": t["id"],
                "reference": position[t["reference_id"]],
                "target": position[t["target_id"]],
                "text": t["text"],
                "direction": t["direction"],
            }
            for t in triplets
        ],
    }


def shard_name(split: str, k: int, n: int) -> str:
    """``train-00000-of-00003.parquet``: the Hub's shard names, which the card's ``configs:`` globs match."""
    return f"{split}-{k:05d}-of-{n:05d}.parquet"


def _row_bytes(row: HubRow) -> int:
    text = json.dumps({k: v for k, v in row.items() if k != "panels"})
    return len(text.encode("utf-8")) + sum(Path(p).stat().st_size for p in row["panels"])


def _row_key(row: HubRow) -> dict[str, Any]:
    """What determines a row's bytes: its texts, and each image file's name and size (renders are never
    rewritten in place: a changed image is a new run, whose folder starts empty)."""
    sizes = [Path(p).stat().st_size for p in row["panels"]]
    return {**row, "panels": [[i, n] for i, n in zip(row["panel_ids"], sizes, strict=True)]}


def _plan(rows: Sequence[HubRow], shard_bytes: int) -> list[list[HubRow]]:
    shards: list[list[HubRow]] = [[]]
    size = 0
    for row in rows:
        n = _row_bytes(row)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += n
    return shards if shards[0] else []


def _write_shard(path: Path, rows: Sequence[HubRow], key: str) -> None:
    import pyarrow as pa  # installed with `datasets` (the `hub` extra), like the rest of the parquet machinery
    import pyarrow.parquet as pq  # (same reason)

    schema = hub_features().arrow_schema
    schema = schema.with_metadata({**(schema.metadata or {}), _KEY: key.encode()})
    options: dict[str, Any] = {"compression": "snappy", "write_statistics": True}
    if int(pa.__version__.split(".")[0]) >= 21:  # as `datasets` writes: dedup-friendly pages on the Hub's storage
        options.update(use_content_defined_chunking=True, write_page_index=True)
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema, **options) as writer:
        batch: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            files = zip(row["panels"], row["panel_ids"], strict=True)
            images = [{"bytes": Path(p).read_bytes(), "path": i} for p, i in files]
            batch.append({**row, "panels": images})
            size += sum(len(im["bytes"]) for im in images)
            if size >= _ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch, size = [], 0
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _stored_key(path: Path) -> bytes | None:
    import pyarrow.parquet as pq  # installed with `datasets` (the `hub` extra)

    try:
        return (pq.read_schema(str(path)).metadata or {}).get(_KEY)
    except (OSError, ValueError):  # a torn or foreign file: rewrite it
        return None


def write_parquet_shards(
    out: Path, rows_by_split: dict[str, Iterable[HubRow]], shard_mb: float = 256
) -> dict[str, list[str]]:
    """Write ``OUT/data/<split>-*.parquet`` from the rows of each split (in order); returns the file names
    (relative to ``out``) per split. Stale ``*.parquet`` files in ``OUT/data`` are removed."""
    out = Path(out)
    if shard_mb <= 0:
        raise ValueError(f"assemble.parquet_shard_mb must be positive, got {shard_mb}")
    written: dict[str, list[str]] = {}
    for split, rows in rows_by_split.items():
        shards = _plan(list(rows), int(shard_mb * 2**20))
        written[split] = []
        for k, shard in enumerate(shards):
            path = out / "data" / shard_name(split, k, len(shards))
            key = hashlib.sha256(json.dumps([_row_key(r) for r in shard], sort_keys=True).encode()).hexdigest()
            if not (path.is_file() and _stored_key(path) == key.encode()):
                _write_shard(path, shard, key)
            written[split].append(str(path.relative_to(out)))
    keep = {out / name for names in written.values() for name in names}
    if (out / "data").is_dir():
        for stale in (out / "data").glob("*.parquet"):
            if stale not in keep:
                stale.unlink()
    return written
