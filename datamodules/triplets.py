"""One's own triplets from a CSV or JSONL file: fine-tune a CIR model on them and validate with Recall@K.

The file has one triplet per row, with image paths relative to ``image_root``::

    reference,text,target,group,split
    shoes/a.jpg,the same shoe in black,shoes/b.jpg,7,train

``reference``, ``text`` and ``target`` are required; ``group`` (triplets whose targets are soft positives of
one another, e.g. several edits of one product) and ``split`` (``train`` or ``val``) are optional. Without a
``split`` column, ``val_fraction`` of the groups (or of the reference images, when there is no ``group``) go to
validation, drawn with ``seed``: whole groups, so no validation query has a training twin.

Validation ranks a gallery of the validation images (every reference and target of the val triplets) and
reports ``triplets/R@1, R@5, R@10, R@50``; each query's own reference image is removed from its ranking.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from coalign.evaluation.evaluator import TargetRecall

from .base import CIRDataModule, GalleryDataset, Transform, TripletDataset

__all__ = ["TripletsDataModule", "read_triplets_file"]

REQUIRED = ("reference", "text", "target")
SPLITS = ("train", "val")


def read_triplets_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a triplets CSV (``.csv``/``.tsv``) or JSON Lines (``.jsonl``) file, checked for columns.

    Raises:
        ValueError: a required column is missing, or rows have empty values (with their line numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triplets file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            rows, columns = _read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson"):
            rows, columns = _read_jsonl(path)
        else:
            raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl file, got {suffix or 'no extension'}")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {missing}; it has {columns}. A triplets file needs the columns "
            f"{list(REQUIRED)} (optional: group, split)"
        )
    if not rows:
        raise ValueError(f"{path} holds no triplets")
    empty = [n for n, r in rows if any(r.get(c) in (None, "") or not str(r.get(c)).strip() for c in REQUIRED)]
    if empty:
        raise ValueError(
            f"{len(empty)} row(s) of {path} have an empty {'/'.join(REQUIRED)} value, at lines {empty[:5]}"
        )
    return [dict(r, line=n) for n, r in rows]


def _read_csv(path: Path, delimiter: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a byte-order mark
        reader = csv.reader(f, delimiter=delimiter)
        header = [c.strip() for c in next(reader, [])]
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise ValueError(f"{path}: the header names the column(s) {repeated} more than once; keep one of each")
        rows = []
        for n, values in enumerate(reader, 2):
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise ValueError(f"{path}:{n} has {len(values)} fields but the header names {len(header)} columns")
            rows.append((n, dict(zip(header, values))))
    return rows, header


def _read_jsonl(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{n} should be a JSON object with reference/text/target, got {line.strip()[:80]}"
                )
            rows.append((n, row))
    return rows, sorted({k for _, r in rows for k in r})


def resolve_image(name: str, image_root: Path, absolute_allowed: bool, where: str) -> Path:
    """The image file a triplets row names, refusing paths that leave ``image_root``.

    Relative paths must stay inside ``image_root`` (no ``..`` out of it); an absolute path is accepted only when
    the file gave no ``image_root`` (``absolute_allowed``), so a shared file cannot read elsewhere on a disk.
    """
    path = Path(name)
    if path.is_absolute():
        if not absolute_allowed:
            raise ValueError(f"{where}: {name!r} is an absolute path, but image_root is {image_root}; give paths "
                             "relative to image_root, or leave image_root out to use absolute paths")  # fmt: skip
        return path
    resolved = (image_root / path).resolve()
    if not resolved.is_relative_to(image_root.resolve()):
        raise ValueError(f"{where}: {name!r} leaves the image folder {image_root}; paths must stay inside it")
    return image_root / path


class TripletsDataModule(CIRDataModule):
    """Fine-tune on one's own (reference image, modification text, target image) triplets.

    Args:
        path: the triplets file (``.csv``, ``.tsv`` or ``.jsonl``) with columns ``reference``, ``text``,
            ``target`` and optionally ``group`` and ``split``.
        image_root: the folder the image paths are relative to (default: the triplets file's folder).
        val_fraction: share of the groups (of the reference images, without a ``group`` column) held out for
            validation when the file has no ``split`` column (0 disables validation).
        seed: seed of that split and of the batch shuffling.
        group_size: triplets of one ``group`` placed together in a training batch (soft positives).
        exclude_reference: remove each validation query's reference image from its ranking.
        batch_size: triplets (or gallery images) per batch.
        num_workers: loader worker processes.
        image_transform: PIL -> tensor; None (the default) waits for ``connect(model.preprocess)``.
        skip_bad_images: drop (with a warning) what needs an image that is missing or cannot be decoded,
            instead of stopping before the first step (training split only for a benchmark).
    """

    has_gallery = True

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        group_size: int = 2,
        exclude_reference: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform: Transform | None = None,
        skip_bad_images: bool = False,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_transform=image_transform,
            skip_bad_images=skip_bad_images,
        )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self._absolute_allowed = image_root is None
        self.val_fraction = val_fraction
        self.seed = seed
        self.group_size = group_size
        self.exclude_reference = exclude_reference
        self.records: dict[str, list[dict[str, Any]]] = {}

    # -- reading and splitting ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        rows = read_triplets_file(self.path)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root {self.image_root} is not a folder")
        groups: dict[str, int] = {}
        records = []
        for r in rows:
            # without a group column each triplet is its own group, and the split keeps a reference's triplets together
            key = str(r["group"]) if str(r.get("group", "")).strip() else f"line {r['line']}"
            records.append(
                {
                    "reference": str(self._image(r, "reference")),
                    "target": str(self._image(r, "target")),
                    "reference_id": r["reference"],
                    "target_id": r["target"],
                    "text": str(r["text"]).strip(),
                    "group": groups.setdefault(key, len(groups)),
                    "unit": key if str(r.get("group", "")).strip() else r["reference"],
                    "split": str(r.get("split") or "").strip().lower(),
                }
            )
        self._assign_splits(records)
        where: dict[str, str] = {}
        for r, row in zip(records, rows):
            for c in ("reference", "target"):
                where.setdefault(r[c], f"{self.path.name} line {row['line']}")
        try:  # one error listing every missing or undecodable image before any step runs, or a listed skip
            records = self.usable_records(records, "image", where)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.path} (image_root {self.image_root}): {err}") from None
        for split in SPLITS:
            chosen = [r for r in records if r["split"] == split]
            self.records[split] = [dict(r, index=i) for i, r in enumerate(chosen)]
        if not self.records["train"]:
            raise ValueError(f"{self.path} has no training triplets")

    def _image(self, row: dict[str, Any], column: str) -> Path:
        where = f"{self.path}:{row['line']} ({column})"
        return resolve_image(str(row[column]), self.image_root, self._absolute_allowed, where)

    def _assign_splits(self, records: list[dict[str, Any]]) -> None:
        given = [r["split"] for r in records]
        if any(given):
            bad = sorted({s for s in given if s not in SPLITS})
            if bad:
                raise ValueError(f"{self.path}: split values must be 'train' or 'val', found {bad}")
            return
        units = sorted({r["unit"] for r in records})
        random.Random(self.seed).shuffle(units)
        n_val = math.ceil(self.val_fraction * len(units)) if self.val_fraction > 0 and len(units) > 1 else 0
        held_out = set(units[:n_val])
        for r in records:
            r["split"] = "val" if r["unit"] in held_out else "train"

    # -- loaders -----------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        records = self.records["train"]
        return self.grouped_loader(
            TripletDataset(records, self.transform), [r["group"] for r in records], self.group_size, self.seed
        )

    def _queries(self) -> DataLoader | list:
        # queries need no target image: the evaluator finds target_id in the gallery
        records = [{k: v for k, v in r.items() if k != "target"} for r in self.records.get("val", [])]
        return self._loader(TripletDataset(records, self.transform)) if records else []

    def val_dataloader(self) -> DataLoader | list:
        return self._queries()

    def test_dataloader(self) -> DataLoader | list:
        return self._queries()

    # -- retrieval evaluation protocol -------------------------------------------------------------------------
    def evaluation_split(self, stage: str) -> str:
        return "val"  # a user's file has no separate test split: test re-runs validation

    def gallery_dataset(self, split: str) -> GalleryDataset:
        if split != "val":
            raise ValueError(f"TripletsDataModule evaluates on the 'val' split, not {split!r}")
        seen: dict[str, str] = {}
        for r in self.records.get("val", []):
            seen.setdefault(r["reference_id"], r["reference"])
            seen.setdefault(r["target_id"], r["target"])
        return GalleryDataset(sorted(seen.items()), self.transform)

    def build_evaluator(self, split: str) -> TargetRecall:
        if split != "val":
            raise ValueError(f"TripletsDataModule evaluates on the 'val' split, not {split!r}")
        # the gallery_dataset order: every reference and target of the val triplets, sorted
        ids = sorted({i for r in self.records.get("val", []) for i in (r["reference_id"], r["target_id"])})
        return TargetRecall(ids, ks=(1, 5, 10, 50), prefix="triplets/", exclude_reference=self.exclude_reference)
