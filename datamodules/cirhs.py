"""CIRHS-style synthetic triplets, as written by ``coalign synthesize`` (format: ``synthesis/README.md``).

Each training batch holds whole chunks of ``group_size`` triplets of one group (the triplets made from one
caption quadruple), so the global contextual alignment loss finds same-group targets in the batch and can treat
them as soft positives. Validation yields plain triplet batches, grouped the same way but in a fixed order, for
the model's in-batch validation loss.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from .base import CIRDataModule, Transform, TripletDataset, check_files_exist

__all__ = ["CIRHSDataModule", "DistributedGroupedBatchSampler", "EpochSequentialSampler", "read_triplets"]


def read_triplets(root: str | Path) -> list[dict[str, Any]]:
    """The records of ``root/triplets.jsonl`` with image paths made absolute, failing early on a bad file."""
    root = Path(root)
    path = root / "triplets.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point root at a folder written by `coalign synthesize`")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            missing = {"reference", "target", "text", "group", "split"} - set(r)
            if missing:
                raise ValueError(f"{path}:{n} lacks {sorted(missing)}")
            # ids stay relative (gallery names), paths become absolute for loading
            r.update(
                reference_id=r["reference"],
                target_id=r["target"],
                reference=str(root / r["reference"]),
                target=str(root / r["target"]),
            )
            records.append(r)
    return records


class EpochSequentialSampler(SequentialSampler):
    """A sequential sampler that remembers the epoch Lightning gives it, for :class:`DistributedGroupedBatchSampler`."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DistributedGroupedBatchSampler(BatchSampler):
    """Batches made of chunks of up to ``group_size`` same-group triplets.

    Each epoch, every group's triplets are shuffled and cut into chunks of ``group_size``; the chunks are
    shuffled and packed into batches without ever splitting one. Under DDP every rank draws the same batch list
    and takes every ``num_replicas``-th batch, so groups stay whole on one rank. When Lightning replaces
    ``sampler`` with a ``DistributedSampler`` (its default under DDP), the rank and world size are read from it.

    Args:
        sampler: its indices are not used; it carries the epoch (``set_epoch``) and, when Lightning made it a
            ``DistributedSampler``, the rank.
        batch_size: triplets per batch; a multiple of ``group_size``.
        drop_last: drop the last incomplete batch.
        groups: group id of each dataset index.
        group_size: triplets of one group kept together (1 disables grouping).
        shuffle: reshuffle every epoch (False: a fixed order, for validation).
        seed: base seed of the shuffles.
    """

    def __init__(
        self,
        sampler,
        batch_size: int,
        drop_last: bool,
        groups: Sequence[int],
        group_size: int = 2,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if group_size < 1 or batch_size % group_size:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of group_size ({group_size})")
        super().__init__(sampler, batch_size, drop_last)
        self.groups = list(groups)
        self.group_size = group_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _replicas(self) -> tuple[int, int]:
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.num_replicas, self.sampler.rank
        return 1, 0

    def _epoch(self) -> int:
        # Lightning calls set_epoch on `batch_sampler.sampler` (an EpochSequentialSampler, or its DistributedSampler)
        return getattr(self.sampler, "epoch", self.epoch)

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self._epoch()}")
        members: dict[int, list[int]] = defaultdict(list)
        for index, group in enumerate(self.groups):
            members[group].append(index)
        chunks = []
        for group in sorted(members):
            items = members[group]
            if self.shuffle:
                rng.shuffle(items)
            chunks += [items[i : i + self.group_size] for i in range(0, len(items), self.group_size)]
        if self.shuffle:
            rng.shuffle(chunks)
        batches, current = [], []
        for chunk in chunks:
            if len(current) + len(chunk) > self.batch_size:
                batches.append(current)
                current = []
            current += chunk
        if current and (len(current) == self.batch_size or not self.drop_last):
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        replicas, rank = self._replicas()
        batches = self._all_batches()
        per_rank = len(batches) // replicas if self.drop_last or replicas == 1 else -(-len(batches) // replicas)
        batches = (batches * 2)[: per_rank * replicas]  # DDP needs the same count everywhere: pad by wrapping
        return iter(batches[rank::replicas])

    def __len__(self) -> int:
        replicas, _ = self._replicas()
        n = len(self._all_batches())
        return n // replicas if self.drop_last or replicas == 1 else -(-n // replicas)


class CIRHSDataModule(CIRDataModule):
    """Synthetic CIRHS triplets from a folder written by ``coalign synthesize``.

    Args:
        root: the dataset folder (``triplets.jsonl``, ``images/``).
        batch_size: triplets per batch.
        num_workers: loader worker processes.
        image_transform: callable PIL -> tensor; None takes the attached model's ``preprocess``.
        group_size: triplets of one group put together in a batch (their targets are soft positives).
        val_split: the split of ``triplets.jsonl`` used for validation.
        seed: seed of the per-epoch batch shuffles.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform: Transform | None = None,
        group_size: int = 2,
        val_split: str = "val",
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_transform=image_transform)
        if batch_size % group_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of group_size ({group_size})")
        self.root = Path(root)
        self.group_size = group_size
        self.val_split = val_split
        self.seed = seed
        self.records: dict[str, list[dict[str, Any]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        records = read_triplets(self.root)
        # one error for all missing images, before any step runs
        check_files_exist(sorted({p for r in records for p in (r["reference"], r["target"])}))
        for split in ("train", self.val_split):
            self.records[split] = [dict(r, index=i) for i, r in enumerate(x for x in records if x["split"] == split)]
        if not self.records["train"]:
            raise ValueError(f"{self.root}/triplets.jsonl has no 'train' triplets")

    def _grouped(self, split: str, shuffle: bool, drop_last: bool) -> DataLoader:
        records = self.records[split]
        dataset = TripletDataset(records, self.transform)
        sampler = DistributedGroupedBatchSampler(
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
