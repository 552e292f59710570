"""The batch format shared by every coalign DataModule, and the base class that produces it.

Every DataModule yields the same dict, so ``CoAlign`` never needs to know where triplets come from.

**Triplet batch** (``train_dataloader``, ``val_dataloader``, ``test_dataloader``, ``predict_dataloader``):

=================  ==================================  =============================================
key                type                                meaning
=================  ==================================  =============================================
``reference``      float ``[B, 3, H, W]``              reference images, already transformed
``text``           ``list[str]``                       modification texts
``target``         float ``[B, 3, H, W]``              target images (absent when a split has no labels)
``reference_id``   ``list[str]``                       gallery name of the reference image
``target_id``      ``list[str]``                       gallery name of the target ("" when unknown)
``group``          long ``[B]``                        group id; same-group triplets are soft positives
``negative``       float ``[B, 3, H, W]``              optional hard negatives, a negative for every query
``index``          long ``[B]``                        position of the query in its split's annotation
=================  ==================================  =============================================

**Gallery batch** (``gallery_dataloader(split)`` of evaluation DataModules): ``image`` float
``[B, 3, H, W]`` and ``image_id`` ``list[str]``.

Images are transformed in the loader workers by ``image_transform``: the model's own ``preprocess``, handed
over once by :meth:`CIRDataModule.connect`, so the images always match the backbone.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler

from coalign.evaluation import EvaluationTask, RetrievalEvaluator
from coalign.io import check_files_exist, load_image

__all__ = [
    "CIRDataModule",
    "TripletDataset",
    "GalleryDataset",
    "GroupedBatchSampler",
    "EpochSequentialSampler",
    "collate",
    "load_image",
    "check_files_exist",
]

Transform = Callable[[Image.Image], Tensor]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists; every item must have the same keys."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, bool)) and not isinstance(values[0], str):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


class TripletDataset(Dataset):
    """Triplets given as records ``{"reference": path, "text": str, "target": path|None, "group": int, ...}``.

    ``reference_id`` / ``target_id`` default to the image paths. Images are loaded lazily.
    """

    def __init__(self, records: list[dict[str, Any]], transform: Transform, text_fn: Callable | None = None):
        self.records = records
        self.transform = transform
        self.text_fn = text_fn  # (record, index) -> str; lets FashionIQ pick a caption join at random

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        item = {
            "reference": self.transform(r["reference_image"] if "reference_image" in r else load_image(r["reference"])),
            "text": self.text_fn(r, i) if self.text_fn else r["text"],
            "reference_id": str(r.get("reference_id", r.get("reference", ""))),
            "target_id": str(r.get("target_id", r.get("target") or "")),
            "group": int(r.get("group", i)),
            "index": int(r.get("index", i)),
        }
        if "negative_image" in r:  # an optional hard negative (e.g. a look-alike of the target)
            item["negative"] = self.transform(r["negative_image"])
            item["negative_id"] = str(r.get("negative_id", ""))
        if "target_image" in r:
            item["target"] = self.transform(r["target_image"])
        elif r.get("target"):
            item["target"] = self.transform(load_image(r["target"]))
        return item


class GalleryDataset(Dataset):
    """Gallery images given as ``(image_id, path_or_PIL)`` pairs."""

    def __init__(self, entries: list[tuple[str, Any]], transform: Transform):
        self.entries = entries
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id, src = self.entries[i]
        image = src if isinstance(src, Image.Image) else load_image(src)
        return {"image": self.transform(image), "image_id": image_id}


class EpochSequentialSampler(SequentialSampler):
    """A sequential sampler that remembers the epoch Lightning gives it, for :class:`GroupedBatchSampler`."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class GroupedBatchSampler(BatchSampler):
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


class CIRDataModule(L.LightningDataModule):
    """Base class: loaders, worker settings, the model's image transform and the evaluation contract.

    **Model -> data: one call.** Images must be transformed the way the model's backbone expects, so before
    ``setup`` the DataModule is handed the model's transform once, by :meth:`connect` (as litgpt's
    ``DataModule.connect``). The ``coalign`` command line does it for you; in Python::

        data = CIRRDataModule("data/CIRR")
        data.connect(model.preprocess)
        trainer.fit(model, datamodule=data)

    **Data -> model: one call.** For validation and test, ``CoAlign`` asks :meth:`evaluation_task` for the
    split's gallery loader and evaluator; a DataModule without a gallery returns None and the model scores its
    batches in-batch instead.

    Args:
        batch_size: triplets (or gallery images) per batch.
        num_workers: loader worker processes (0 loads in the main process).
        image_transform: callable PIL -> tensor; None (the default) waits for :meth:`connect`.
    """

    def __init__(self, batch_size: int = 32, num_workers: int = 0, image_transform: Transform | None = None):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_transform = image_transform

    # -- transform ---------------------------------------------------------------------------------------
    def connect(self, image_transform: Transform) -> None:
        """Hand over the model's image transform (``model.preprocess``); call once, before ``setup``.

        A transform given to the constructor wins: ``connect`` then changes nothing.
        """
        if self.image_transform is None:
            self.image_transform = image_transform

    @property
    def transform(self) -> Transform:
        if self.image_transform is None:
            raise RuntimeError(
                f"{type(self).__name__} has no image transform: call datamodule.connect(model.preprocess) before "
                "training or evaluating (the coalign command line does it), or pass image_transform=..."
            )
        return self.image_transform

    # -- loaders -----------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool = False, batch_sampler=None) -> DataLoader:
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "persistent_workers": self.num_workers > 0,
        }
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, **kwargs)

    def grouped_loader(self, dataset: Dataset, groups: Sequence[int], group_size: int, seed: int = 0) -> DataLoader:
        """A shuffled training loader whose batches hold ``group_size`` triplets of a group together (DDP-safe)."""
        drop_last = len(dataset) >= self.batch_size  # a tiny dataset still gives one (smaller) batch
        sampler = GroupedBatchSampler(
            EpochSequentialSampler(dataset), self.batch_size, drop_last, groups, group_size, seed=seed
        )
        return self._loader(dataset, batch_sampler=sampler)

    def gallery_dataloader(self, split: str) -> DataLoader:
        """Loader over the gallery images of ``split`` (evaluation DataModules override ``gallery_dataset``)."""
        return self._loader(self.gallery_dataset(split))

    def gallery_dataset(self, split: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no gallery")

    # -- retrieval evaluation protocol (CoAlign's validation/test steps and `coalign evaluate`) --------------
    #: True for DataModules whose val/test loaders yield *queries* ranked against a gallery. Such a module
    #: implements ``gallery_dataset``, ``build_evaluator`` and, if its split names differ, ``evaluation_split``.
    has_gallery: bool = False

    def evaluation_task(self, stage: str) -> EvaluationTask | None:
        """What the model needs to evaluate a Lightning stage ("validate" or "test") against a gallery.

        Returns None for a DataModule without a gallery (the model then reports in-batch loss and recall).
        The ``val_dataloader`` / ``test_dataloader`` batches are the task's queries.
        """
        if not self.has_gallery:
            return None
        split = self.evaluation_split(stage)
        return EvaluationTask(
            split=split,
            gallery=self.gallery_dataloader(split),
            evaluator=self.build_evaluator(split),
            upload_files=functools.partial(self.ranking_files, split),
        )

    def evaluation_split(self, stage: str) -> str:
        """The split a Lightning stage ("validate" or "test") evaluates."""
        return {"validate": "val", "fit": "val", "test": "test"}[stage]

    def build_evaluator(self, split: str) -> RetrievalEvaluator:
        """A fresh :class:`~coalign.evaluation.RetrievalEvaluator` for ``split`` (a torchmetrics ``Metric``, so it
        syncs across DDP ranks)."""
        raise NotImplementedError(f"{type(self).__name__} has no retrieval evaluator")

    def ranking_files(self, split: str, evaluator: RetrievalEvaluator) -> dict[str, dict]:
        """The rankings of a finished evaluation in the benchmark's upload format(s): file name -> JSON object.
        None of them by default (only the official benchmarks have upload formats)."""
        return {}
