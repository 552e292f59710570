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
``group``          long ``[B]``                        group id: the group's other targets are soft positives
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
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler

from coalign.evaluation import EvaluationTask, RetrievalEvaluator
from coalign.io import check_files_exist, load_image

from .images import find_bad_images, image_problem

__all__ = [
    "CIRDataModule",
    "TripletDataset",
    "GalleryDataset",
    "GroupedBatchSampler",
    "EpochSequentialSampler",
    "ResumableDataLoader",
    "find_bad_images",
    "image_problem",
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
        if r.get("target_caption"):  # a description of the target image (synthetic data), for caption alignment
            item["target_caption"] = str(r["target_caption"])
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
    """Batches made of whole groups, or of chunks of up to ``group_size`` same-group triplets.

    Each epoch, every group's triplets are shuffled and cut into chunks of ``group_size`` (``group_size=0``: the
    whole group is one chunk; a group larger than ``batch_size`` is cut into chunks of ``batch_size``); the chunks
    are shuffled and packed into batches without ever splitting one, so a batch may hold fewer than
    ``batch_size`` triplets when the next chunk does not fit. Under DDP every rank draws the same batch list
    and takes every ``num_replicas``-th batch, so groups stay whole on one rank. When Lightning replaces
    ``sampler`` with a ``DistributedSampler`` (its default under DDP), the rank and world size are read from it.

    **Resumable**: ``state_dict()`` is the epoch and the batches already yielded in it; after ``load_state_dict``
    the next iteration of that epoch skips them (no image is loaded for them), so a resumed run sees the batches
    an uninterrupted one would. :class:`ResumableDataLoader` saves the count of batches it actually returned.

    Args:
        sampler: its indices are not used; it carries the epoch (``set_epoch``) and, when Lightning made it a
            ``DistributedSampler``, the rank.
        batch_size: triplets per batch; a multiple of ``group_size`` when that is not 0.
        drop_last: drop the last incomplete batch.
        groups: group id of each dataset index.
        group_size: triplets of one group kept together (1 disables grouping; 0 keeps every group whole).
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
        if group_size < 0 or batch_size < 1 or (group_size and batch_size % group_size):
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of group_size ({group_size}); "
                "group_size 0 keeps whole groups"
            )
        super().__init__(sampler, batch_size, drop_last)
        self.groups = list(groups)
        self.group_size = group_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skipped = 0  # batches the current iteration skipped (a resumed epoch)
        self._yielded = 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many batches of it this rank's iterator has yielded."""
        return {"epoch": self._epoch(), "batches": self._yielded}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume ``state["epoch"]`` after its first ``state["batches"]`` batches (the next iteration only)."""
        epoch = int(state["epoch"])
        self.set_epoch(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._resume = (epoch, int(state["batches"]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resumes_mid_epoch(self) -> bool:
        """Whether the next iteration continues the epoch of a loaded state (rather than starting one)."""
        return self._resume is not None and self._resume[0] == self._epoch() and self._resume[1] > 0

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
            size = self.group_size or self.batch_size
            chunks += [items[i : i + size] for i in range(0, len(items), size)]
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
        resume, self._resume = self._resume, None
        # a resume applies only to its own epoch (Lightning moves on to the next one after an end-of-epoch save)
        self.skipped = self._yielded = resume[1] if resume and resume[0] == self._epoch() else 0
        return self._count(batches[rank::replicas][self.skipped :])

    def _count(self, batches: list[list[int]]) -> Iterator[list[int]]:
        for batch in batches:
            self._yielded += 1
            yield batch

    def __len__(self) -> int:
        replicas, _ = self._replicas()
        n = len(self._all_batches())
        return n // replicas if self.drop_last or replicas == 1 else -(-n // replicas)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`GroupedBatchSampler` that Lightning can stop and resume mid-epoch.

    Lightning 2.x stores the ``state_dict()`` of every training loader that has one in the checkpoint
    (``loops.fit_loop.state_dict.combined_loader``) and hands it to ``load_state_dict`` before it iterates the
    loader of a resumed run. The state is the epoch, the number of batches this loader has *returned* (not what
    its workers prefetched) and the random states of ``torch`` and ``random`` (dropout, masking) at that moment,
    so the resumed run continues with the batch, and the random draws, an uninterrupted run would see.
    """

    _returned = 0
    _rng: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        rng, self._rng = self._rng, None
        mid_epoch = getattr(self.batch_sampler, "resumes_mid_epoch", lambda: False)()
        if rng is not None and not mid_epoch:  # a new epoch: an uninterrupted run would start it from here
            _set_rng(rng)
        iterator = super().__iter__()  # the batch sampler starts here and applies a pending resume
        if rng is not None and mid_epoch:  # after the seed the iterator draws, which a running epoch has done
            _set_rng(rng)
        self._returned = getattr(self.batch_sampler, "skipped", 0)
        for batch in iterator:
            self._returned += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return {**self.batch_sampler.state_dict(), "batches": self._returned, "rng": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
        self._rng = state.get("rng")


def _set_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        skip_bad_images: drop (with a warning) the records that need an image that is missing or cannot be
            decoded, instead of failing in ``setup`` with the list of every bad file.
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform: Transform | None = None,
        skip_bad_images: bool = False,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_transform = image_transform
        self.skip_bad_images = skip_bad_images

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

    # -- image checks (in setup, so a bad file stops the run before the first step) -----------------------
    def check_images(
        self, paths: Sequence[str | Path], what: str, where: Mapping[str, str] | None = None, skip: bool | None = None
    ) -> set[str]:
        """Decode every image of ``paths`` (see :func:`find_bad_images`); return the bad ones.

        Raises one error listing every bad file with ``where[path]`` (its annotation row/entry), unless ``skip``
        (default: ``skip_bad_images``) is set: then the caller drops what needs them (:meth:`usable_records`).
        """
        skip = self.skip_bad_images if skip is None else skip
        paths = [str(p) for p in paths]
        if not skip:
            check_files_exist(paths, what=what)  # the missing ones first, as their own error
        bad = find_bad_images(paths)
        if bad and not skip:
            where = where or {}
            lines = [f"{p}{f' ({where[p]})' if p in where else ''}: {bad[p]}" for p in sorted(bad)]
            raise ValueError(
                f"{len(bad)} of {len(set(paths))} {what} files cannot be decoded; replace or remove them, or pass "
                "skip_bad_images=True (--data.skip_bad_images true) to drop what needs them:\n  " + "\n  ".join(lines)
            )
        return set(bad)

    def usable_records(
        self, records: list[dict[str, Any]], what: str, where: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """``records`` whose ``reference`` and ``target`` images decode (all of them, or an error, unless
        ``skip_bad_images``: the others are dropped with a warning giving the counts and the first bad files)."""
        paths = sorted({r[k] for r in records for k in ("reference", "target") if r.get(k)})
        bad = self.check_images(paths, what, where)
        if not bad:
            return records
        kept = [r for r in records if r.get("reference") not in bad and r.get("target") not in bad]
        warnings.warn(
            f"skip_bad_images: {len(bad)} of {len(paths)} {what} files are missing or cannot be decoded "
            f"(e.g. {', '.join(sorted(bad)[:3])}); dropped the {len(records) - len(kept)} of {len(records)} "
            "triplets that need them",
            stacklevel=2,
        )
        return kept

    # -- loaders -----------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool = False, batch_sampler=None) -> DataLoader:
        """A loader yielding :func:`collate` batches. A shuffled loader (``shuffle``, or a shuffling
        :class:`GroupedBatchSampler`) is a training loader: it is resumable mid-epoch and must not be empty."""
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "persistent_workers": self.num_workers > 0,
        }
        if batch_sampler is None and not shuffle:
            return DataLoader(dataset, batch_size=self.batch_size, **kwargs)
        if batch_sampler is None:  # a plain shuffle, seeded per epoch so that a resumed run sees the same order
            groups = range(len(dataset))
            batch_sampler = GroupedBatchSampler(EpochSequentialSampler(dataset), self.batch_size, False, groups, 1)
            batch_sampler.seed = getattr(self, "seed", 0)
        resumable = hasattr(batch_sampler, "state_dict")
        loader = (ResumableDataLoader if resumable else DataLoader)(dataset, batch_sampler=batch_sampler, **kwargs)
        if getattr(batch_sampler, "shuffle", False) and len(loader) == 0:
            raise ValueError(
                f"{type(self).__name__}: the training data gives 0 batches ({len(dataset)} triplets, batch_size "
                f"{batch_sampler.batch_size}, drop_last={batch_sampler.drop_last}), so nothing would be trained: "
                "lower batch_size below the number of training triplets, or add data"
            )
        return loader

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
