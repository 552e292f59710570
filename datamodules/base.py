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

Images are transformed in the loader workers by ``image_transform``. When it is None, the DataModule asks
the attached model for its own (``trainer.lightning_module.preprocess``) at ``setup``, so the images always
match the backbone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "CIRDataModule",
    "TripletDataset",
    "GalleryDataset",
    "GroupedBatchSampler",
    "collate",
    "load_image",
    "check_files_exist",
]

Transform = Callable[[Image.Image], Tensor]


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, with an error that names the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def check_files_exist(paths: Sequence[str | Path], what: str = "image") -> None:
    """Raise one error listing how many files are missing and the first few, before any work starts."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        first = "\n  ".join(missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} files are missing, e.g.:\n  {first}")


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


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches that hold several triplets of one group, for the global head's same-group soft positives.

    Each epoch the groups are shuffled (seeded by ``seed + epoch``), each group contributes chunks of up to
    ``group_size`` of its (shuffled) items, and the chunks are packed into batches of ``batch_size``. Every item
    appears exactly once per epoch; ``group_size = 1`` is a plain shuffled sampler.

    Args:
        groups: the group id of every item of the dataset.
        batch_size: items per batch.
        group_size: how many triplets of one group are placed together.
        drop_last: drop the last incomplete batch.
        seed: base seed of the shuffling.
    """

    def __init__(
        self, groups: Sequence[int], batch_size: int, group_size: int = 2, drop_last: bool = True, seed: int = 0
    ):
        if group_size < 1 or batch_size < 1:
            raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size} and {group_size}")
        self.members: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            self.members.setdefault(int(group), []).append(index)
        self.n = len(groups)
        self.batch_size = batch_size
        self.group_size = group_size
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        chunks = []
        for items in self.members.values():
            items = items[:]
            rng.shuffle(items)
            chunks.extend(items[i : i + self.group_size] for i in range(0, len(items), self.group_size))
        rng.shuffle(chunks)
        return chunks

    def __iter__(self):
        batch: list[int] = []
        for chunk in self._chunks():
            for index in chunk:
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch and not self.drop_last:
            yield batch
        self.epoch += 1

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)


class CIRDataModule(L.LightningDataModule):
    """Base class: loaders, worker settings and the model's image transform.

    Args:
        batch_size: triplets (or gallery images) per batch.
        num_workers: loader worker processes (0 loads in the main process).
        image_transform: callable PIL -> tensor; None takes the attached model's ``preprocess``.
    """

    def __init__(self, batch_size: int = 32, num_workers: int = 0, image_transform: Transform | None = None):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_transform = image_transform

    # -- transform ---------------------------------------------------------------------------------------
    @property
    def transform(self) -> Transform:
        if self.image_transform is None:
            module = getattr(getattr(self, "trainer", None), "lightning_module", None)
            if module is None or not hasattr(module, "preprocess"):
                raise RuntimeError(
                    f"{type(self).__name__} has no image_transform: pass one, or attach it to a Trainer with a "
                    "CoAlign model so it can use model.preprocess"
                )
            self.image_transform = module.preprocess
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

    def gallery_dataloader(self, split: str) -> DataLoader:
        """Loader over the gallery images of ``split`` (evaluation DataModules override ``gallery_dataset``)."""
        return self._loader(self.gallery_dataset(split))

    def gallery_dataset(self, split: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no gallery")

    def query_dataset(self, split: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no evaluation queries")

    # -- retrieval evaluation protocol (used by CoAlign's validation/test steps and `coalign evaluate`) --------
    #: True for DataModules whose val/test loaders yield *queries* ranked against a gallery. Such a module
    #: implements ``evaluation_split``, ``gallery_dataloader`` and ``build_evaluator``.
    has_gallery: bool = False

    def evaluation_split(self, stage: str) -> str:
        """The split a Lightning stage ("validate" or "test") evaluates: the ``val_dataloader`` /
        ``test_dataloader`` batches are its queries and ``gallery_dataloader(split)`` its gallery."""
        return {"validate": "val", "fit": "val", "test": "test"}[stage]

    def build_evaluator(self, split: str):
        """A fresh evaluator for ``split``: an object (a ``torchmetrics.Metric``, so it syncs across DDP ranks)
        with attributes ``top_k`` (ranking length it needs) and ``exclude_reference`` (remove each query's
        reference image from its ranking), ``update(batch, ranked_ids: list[list[str]], ranked_scores)`` and
        ``compute() -> dict[str, float]`` (percentages, keys such as ``"cirr/R@1"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no retrieval evaluator")
