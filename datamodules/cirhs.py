"""CIRHS-style synthetic triplets, as written by ``coalign synthesize`` (format: ``synthesis/README.md``).

Each training batch holds chunks of ``group_size`` triplets of one group (``group_size 0``: whole groups, all the
triplets reorganised from one rendered group: source <-> edits and edit -> edit), so the global contextual
alignment loss finds same-group targets in the batch and can treat them as soft positives. Validation yields
plain triplet batches, grouped the same way but in a fixed order, for the model's in-batch validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from .base import (
    CIRDataModule,
    EpochSequentialSampler,
    GroupedBatchSampler,
    Transform,
    TripletDataset,
)

__all__ = ["CIRHSDataModule", "read_triplets"]


def read_triplets(root: str | Path) -> list[dict[str, Any]]:
    """The records of ``root/triplets.jsonl`` with image paths made absolute, failing early on a bad file.

    ``reference_id`` / ``target_id`` (image ids, so that training can tell a query's own reference among its
    group's targets) are read when present and default to the relative image paths; ``group`` must be an int.
    """
    root = Path(root)
    path = root / "triplets.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point root at a folder written by `coalign synthesize`")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not JSON ({err.msg}): rerun the assemble stage") from None
            missing = {"reference", "target", "text", "group", "split"} - set(r)
            if missing:
                raise ValueError(f"{path}:{n} lacks {sorted(missing)}: rerun the assemble stage")
            if type(r["group"]) is not int:
                raise ValueError(f"{path}:{n} has group {r['group']!r}; groups are ints: rerun the assemble stage")
            for key in ("reference_id", "target_id"):
                if key in r and not (isinstance(r[key], str) and r[key]):
                    raise ValueError(f"{path}:{n} has {key} {r[key]!r}, not an image id string")
            # ids stay relative (gallery names), paths become absolute for loading
            r.update(
                reference_id=r.get("reference_id", r["reference"]),
                target_id=r.get("target_id", r["target"]),
                reference=str(root / r["reference"]),
                target=str(root / r["target"]),
            )
            records.append(r)
    return records


class StyleJitter:
    """``transform(image)`` after a random per-channel colour offset of up to ``amount`` of the range."""

    def __init__(self, transform: Transform, amount: float):
        self.transform = transform
        self.amount = amount

    def __call__(self, image: Image.Image) -> Tensor:
        # torch's generator: the loader seeds it in every worker (numpy's would repeat across forked workers)
        offset = (torch.rand(3) * 2 - 1) * self.amount * 255.0
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
        shifted = (pixels + offset).clamp(0, 255).to(torch.uint8).numpy()
        return self.transform(Image.fromarray(shifted))


class CIRHSDataModule(CIRDataModule):
    """Synthetic CIRHS triplets from a folder written by ``coalign synthesize``.

    Args:
        root: the dataset folder (``triplets.jsonl``, ``images/``).
        batch_size: triplets per batch.
        num_workers: loader worker processes.
        image_transform: callable PIL -> tensor; None (the default) waits for ``connect(model.preprocess)``.
        group_size: triplets of one group put together in a batch (their targets are soft positives); 0 keeps
            every group whole: all the triplets reorganised from one source and its edits share a batch. Chunks of
            4 (the default) measured better than whole groups on Shapes (PERFORMANCE.md, "Zero-shot").
        val_split: the split of ``triplets.jsonl`` used for validation.
        seed: seed of the per-epoch batch shuffles.
        style_jitter: shift each training image's colours by a random per-channel offset of up to this fraction
            of the range (0 disables). The panels of one synthesized composite share their style (background
            tint, lighting); a contrastive batch whose negatives come from other groups can then match a query
            to its target by that shared style alone. Jittering every image on its own removes the cue.
        skip_bad_images: drop (with a warning) the triplets whose images are missing or cannot be decoded.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform: Transform | None = None,
        group_size: int = 4,
        val_split: str = "val",
        seed: int = 0,
        style_jitter: float = 0.0,
        skip_bad_images: bool = False,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_transform=image_transform,
            skip_bad_images=skip_bad_images,
        )
        if not 0.0 <= style_jitter <= 1.0:
            raise ValueError(f"style_jitter is a fraction of the colour range in [0, 1], got {style_jitter}")
        self.style_jitter = style_jitter
        if group_size < 0 or (group_size and batch_size % group_size):
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of group_size ({group_size}); 0 keeps whole groups"
            )
        self.root = Path(root)
        self.group_size = group_size
        self.val_split = val_split
        self.seed = seed
        self.records: dict[str, list[dict[str, Any]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        records = read_triplets(self.root)
        # one error for all missing or undecodable images, before any step runs (or a listed skip)
        where = {r[k]: f"triplets.jsonl triplet {n}" for n, r in enumerate(records, 1) for k in ("reference", "target")}
        records = self.usable_records(records, "image", where)
        for split in ("train", self.val_split):
            self.records[split] = [dict(r, index=i) for i, r in enumerate(x for x in records if x["split"] == split)]
        if not self.records["train"]:
            raise ValueError(f"{self.root}/triplets.jsonl has no 'train' triplets")

    def _grouped(self, split: str, shuffle: bool, drop_last: bool) -> DataLoader:
        records = self.records[split]
        jitter = self.style_jitter if split == "train" else 0.0
        dataset = TripletDataset(records, StyleJitter(self.transform, jitter) if jitter else self.transform)
        sampler = GroupedBatchSampler(
            EpochSequentialSampler(dataset),
            self.batch_size,
            drop_last,
            [r["group"] for r in records],
            self.group_size,
            shuffle,
            self.seed,
        )
        return self._loader(dataset, batch_sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._grouped("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.records.get(self.val_split):
            return []
        return self._grouped(self.val_split, shuffle=False, drop_last=False)
