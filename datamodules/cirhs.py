"""CIRHS-style synthetic triplets, as written by ``coalign synthesize`` (format: ``synthesis/README.md``).

Three sources, one batch format (``root``):

* a folder with ``triplets.jsonl`` and ``images/`` (what ``coalign synthesize`` writes; no extra dependency);
* a folder with only the Hub's format, ``data/<split>-*.parquet`` and the card (one row per group, panels
  embedded: ``synthesis/hub_format.py``), read with ``datasets.load_dataset`` into memory-mapped Arrow;
* a Hub dataset id ``owner/name`` in that format, downloaded (and cached) by ``datasets.load_dataset``.

The parquet rows are expanded into the same triplet records as ``triplets.jsonl`` (same order, ``group``,
``reference_id``, ``target_id``, texts and split), so the batches are identical; images are decoded from the row
when a triplet is loaded. ``streaming=True`` reads the parquet shards (local or on the Hub) without a copy on disk:
see :class:`StreamingTriplets`. ``datasets`` is imported only for these two paths (``pip install "coalign[hub]"``).

Each training batch holds chunks of ``group_size`` triplets of one group (``group_size 0``: whole groups, all the
triplets reorganised from one rendered group: source <-> edits and edit -> edit), so the global contextual
alignment loss finds same-group targets in the batch and can treat them as soft positives. Validation yields
plain triplet batches, grouped the same way but in a fixed order, for the model's in-batch validation loss.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .base import (
    CIRDataModule,
    EpochSequentialSampler,
    GroupedBatchSampler,
    Transform,
    TripletDataset,
    collate,
)

__all__ = ["CIRHSDataModule", "read_triplets", "expand_group", "ParquetTriplets", "StreamingTriplets"]

#: A Hub dataset id: ``owner/name`` (what ``datasets.load_dataset`` resolves on the Hub).
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
#: The columns of a row that a triplet record needs (every column but the images).
_META_COLUMNS = ["group", "id", "domain", "edit_type", "panel_ids", "captions", "triplets"]


def _datasets():
    try:
        import datasets  # optional (the `hub` extra): only the parquet, Hub and streaming paths need it
        import datasets.distributed  # (same reason) split_dataset_by_node, for DDP streaming
    except ImportError:
        raise ImportError(
            'CIRHSDataModule reads parquet shards and Hub datasets with `datasets`: pip install "coalign[hub]"'
        ) from None
    return datasets


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


def expand_group(row: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The triplet records of one parquet row (a group), as :func:`read_triplets` gives them from
    ``triplets.jsonl`` (ids, texts, captions, group, split), plus ``reference_panel`` / ``target_panel`` (positions
    in the row's ``panels``). ``reference`` / ``target`` are the image ids (there is no file)."""
    ids, captions = row["panel_ids"], row["captions"]
    out = []
    for t in row["triplets"]:
        a, b = t["reference"], t["target"]
        if not (0 <= a < len(ids) and 0 <= b < len(ids)):
            raise ValueError(
                f"group {row['id']} has triplet {t['id']} with panel {a} -> {b}, but {len(ids)} panels: "
                "rerun the assemble stage"
            )
        out.append(
            {
                "id": t["id"],
                "reference": ids[a],
                "target": ids[b],
                "reference_id": ids[a],
                "target_id": ids[b],
                "text": t["text"],
                "group": int(row["group"]),
                "split": split,
                "direction": t["direction"],
                "reference_caption": captions[a],
                "target_caption": captions[b],
                "domain": row["domain"],
                "edit_type": row["edit_type"],
                "reference_panel": a,
                "target_panel": b,
            }
        )
    return out


def _decode(image: Any, where: str) -> Image.Image:
    """An RGB PIL image from a decoded ``Image`` feature (PIL) or a stored one (``{"bytes", "path"}``)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(io.BytesIO(image["bytes"])) as im:
            return im.convert("RGB")
    except (OSError, ValueError, TypeError) as err:
        raise OSError(f"cannot decode {where}: {err}") from err


def _item(record: dict[str, Any], panels: list[Any], transform: Transform) -> dict[str, Any]:
    """One triplet in the shared item format (:class:`.base.TripletDataset`), its images taken from ``panels``."""
    where = f"panel {{}} of group {record['group']} ({record['id']})"
    images = {
        "reference_image": _decode(panels[record["reference_panel"]], where.format(record["reference_panel"])),
        "target_image": _decode(panels[record["target_panel"]], where.format(record["target_panel"])),
    }
    return TripletDataset([{**record, **images}], transform)[0]


class ParquetTriplets(Dataset):
    """The triplets of one split of a (non-streamed) ``datasets.Dataset`` of group rows, images read on demand.

    ``records`` are :func:`expand_group`'s, each with ``row`` (the row in ``rows``) and ``index``. ``rows`` is
    memory-mapped Arrow: a worker reads only the row of the triplet it loads.
    """

    def __init__(self, rows: Any, records: list[dict[str, Any]], transform: Transform):
        self.rows = rows.select_columns(["panels"]).with_format("arrow")  # stored bytes: decode only the 2 used
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        panels = self.rows[record["row"]].column("panels")[0].as_py()
        return _item(record, panels, self.transform)


class StreamingTriplets(IterableDataset):
    """Batches of triplets streamed from a ``datasets.IterableDataset`` of group rows (``load_dataset(...,
    streaming=True)``), with the batch layout of :class:`.base.GroupedBatchSampler`.

    Each epoch (``epoch``, set by the loader before its workers start): the rows are shuffled with a buffer of
    ``buffer_size`` rows and a new shard order (``.shuffle(seed, buffer_size)`` + ``set_epoch(epoch)``: a row
    leaves the buffer at a random position once it is full, so the order is random within a window of that
    many groups, not over the whole dataset), split across DDP ranks (``split_dataset_by_node``) and, by
    ``datasets`` itself, across loader workers by shard. Each group's triplets are shuffled and cut into chunks
    of ``group_size`` (0: the whole group, cut at ``batch_size``); the chunks go through a second shuffle buffer of
    a few batches' worth and are packed into batches without splitting one (as the grouped sampler does), so
    the chunks of one group are not always side by side. Without ``shuffle`` (validation), the rows and
    triplets keep their order.

    Every worker yields collated batches (the loader's ``batch_size`` is None). ``drop_last`` drops a worker's
    last incomplete batch. ``index`` is the triplet's position in this rank's and worker's stream.

    Under DDP (``world_size > 1``) every rank must yield the same number of batches: ``steps`` (``num_triplets
    // (batch_size * world_size)``) is the count, shared out over the workers, and a rank that runs out first
    continues into a new shuffled pass of its rows.
    """

    def __init__(
        self,
        source: Any,
        transform: Transform,
        split: str,
        batch_size: int,
        group_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        buffer_size: int = 1000,
    ):
        self.source = source
        self.transform = transform
        self.split = split
        self.batch_size = batch_size
        self.group_size = group_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.buffer_size = buffer_size
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        self.steps: int | None = None  # batches per rank and epoch under DDP

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self, passes: int) -> Iterator[dict[str, Any]]:
        rows = self.source
        if self.shuffle:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            rows.set_epoch(self.epoch * 1_000_003 + passes)  # later passes (DDP wrap-around) reshuffle
        if self.world_size > 1:
            rows = _datasets().distributed.split_dataset_by_node(rows, rank=self.rank, world_size=self.world_size)
        return iter(rows)

    def _chunks(self, rng: random.Random, passes: int) -> Iterator[list[tuple[dict[str, Any], list[Any]]]]:
        size = self.group_size or self.batch_size
        buffer: list[list[tuple[dict[str, Any], list[Any]]]] = []
        capacity = 4 * max(1, self.batch_size // size) if self.shuffle else 1
        for row in self._rows(passes):
            triplets = [(r, row["panels"]) for r in expand_group(row, self.split)]
            if self.shuffle:
                rng.shuffle(triplets)
            for chunk in (triplets[i : i + size] for i in range(0, len(triplets), size)):
                buffer.append(chunk)
                if len(buffer) >= capacity:
                    yield buffer.pop(rng.randrange(len(buffer)) if self.shuffle else 0)
        if self.shuffle:
            rng.shuffle(buffer)
        yield from buffer

    def _batches(self, rng: random.Random, passes: int) -> Iterator[list[tuple[dict[str, Any], list[Any]]]]:
        current: list[tuple[dict[str, Any], list[Any]]] = []
        for chunk in self._chunks(rng, passes):
            if len(current) + len(chunk) > self.batch_size:
                yield current
                current = []
            current += chunk
        if current and (len(current) == self.batch_size or not self.drop_last):
            yield current

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        want = None
        if self.steps is not None:
            want = self.steps // workers + (worker < self.steps % workers)
        index, done, passes = 0, 0, 0
        while want is None or done < want:
            before = done
            for batch in self._batches(rng, passes):
                if want is not None and done >= want:
                    return
                items = []
                for record, panels in batch:
                    items.append(_item({**record, "index": index}, panels, self.transform))
                    index += 1
                done += 1
                yield collate(items)
            if want is None:
                return
            if done == before:
                raise RuntimeError(
                    f"streaming: rank {self.rank} worker {worker} got no {self.split} rows, so the ranks' batch "
                    f"counts cannot match; use fewer loader workers (the dataset has {self.source.num_shards} "
                    "shards) or more data"
                )
            passes += 1


class _EpochLoader(DataLoader):
    """A loader over :class:`StreamingTriplets` that calls ``prepare(dataset, n)`` (``n``: the iterations so far)
    before its workers start, to hand over the epoch and the DDP rank (Lightning calls ``set_epoch`` on samplers
    only; the workers are not persistent, so each epoch's workers get the new epoch)."""

    def __init__(self, dataset: StreamingTriplets, num_workers: int, prepare: Callable[[StreamingTriplets, int], None]):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.prepare = prepare
        self._iterations = 0

    def __iter__(self):
        self.prepare(self.dataset, self._iterations)
        self._iterations += 1
        return super().__iter__()


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
    """Synthetic CIRHS triplets from a folder written by ``coalign synthesize``, its parquet shards, or the Hub.

    Args:
        root: a folder with ``triplets.jsonl`` and ``images/``; or a folder with the parquet shards
            ``data/*.parquet`` and the card (``push_to_hub``'s layout); or a Hub dataset id ``owner/name`` in that
            format. A folder with both is read from ``triplets.jsonl``, unless ``streaming``.
        batch_size: triplets per batch.
        num_workers: loader worker processes.
        image_transform: callable PIL -> tensor; None (the default) waits for ``connect(model.preprocess)``.
        group_size: triplets of one group put together in a batch (their targets are soft positives); 0 keeps
            every group whole: all the triplets reorganised from one source and its edits share a batch. Chunks of
            4 (the default) measured better than whole groups on Shapes (PERFORMANCE.md, "Zero-shot").
        val_split: the split used for validation.
        seed: seed of the per-epoch batch shuffles.
        style_jitter: shift each training image's colours by a random per-channel offset of up to this fraction
            of the range (0 disables). The panels of one synthesized composite share their style (background
            tint, lighting); a contrastive batch whose negatives come from other groups can then match a query
            to its target by that shared style alone. Jittering every image on its own removes the cue.
        skip_bad_images: drop (with a warning) the triplets whose images are missing or cannot be decoded
            (``triplets.jsonl`` only: parquet rows embed images that passed the synthesis' image check).
        streaming: read the parquet shards as a stream (``datasets`` streaming, local or from the Hub), for data
            larger than the disk: nothing is copied, rows are shuffled within ``shuffle_buffer`` groups
            (:class:`StreamingTriplets`).
        shuffle_buffer: rows (groups) in the streaming shuffle buffer; larger mixes better and holds more images
            in memory.
        cache_dir: where ``datasets`` keeps its Arrow copy of non-streamed parquet data (default: its cache).
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
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
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
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer is a number of rows (groups), at least 1; got {shuffle_buffer}")
        self.root = root
        self.group_size = group_size
        self.val_split = val_split
        self.seed = seed
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.rows: dict[str, Any] = {}  # split -> datasets.Dataset (parquet) or IterableDataset (streaming)
        self._num_triplets: dict[str, int] = {}

    # -- where the data is -------------------------------------------------------------------------------
    def _source(self) -> str:
        """``jsonl``, ``parquet`` (a local folder) or ``hub``; one error naming what was expected otherwise."""
        path = Path(self.root)
        has_parquet = path.is_dir() and any(path.glob("data/*.parquet"))
        if (path / "triplets.jsonl").is_file() and not self.streaming:
            return "jsonl"
        if has_parquet:
            return "parquet"
        if path.is_dir() and (path / "triplets.jsonl").is_file():
            raise FileNotFoundError(
                f"{path} has triplets.jsonl but no data/*.parquet: streaming reads the parquet shards; "
                'pip install "coalign[hub]" and rerun `coalign synthesize ... --stage assemble`, or drop streaming'
            )
        if not path.exists() and _HUB_ID.fullmatch(str(self.root)):
            return "hub"
        raise FileNotFoundError(
            f"{self.root} is neither a folder with triplets.jsonl (written by `coalign synthesize`) or "
            "data/*.parquet (its Hub format), nor a Hub dataset id owner/name"
        )

    def _load(self, streaming: bool) -> Any:
        """``datasets.load_dataset(root)``: a DatasetDict, or an IterableDatasetDict when ``streaming``."""
        datasets = _datasets()
        try:
            return datasets.load_dataset(str(self.root), streaming=streaming, cache_dir=self.cache_dir)
        except Exception as err:  # not found, offline, no access, not this format: one message, the cause chained
            raise FileNotFoundError(
                f"cannot load {self.root} with datasets.load_dataset ({type(err).__name__}: {err}); expected a "
                "folder with triplets.jsonl or data/*.parquet written by `coalign synthesize`, or a Hub dataset "
                "id owner/name in that format (check the id, your access and the network)"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if self.records or self.rows:
            return
        source = self._source()
        if source == "jsonl":
            self._setup_jsonl()
            return
        splits = self._load(self.streaming)
        if "train" not in splits:
            raise ValueError(f"{self.root} has no 'train' split (it has {sorted(splits)}): rerun the assemble stage")
        for split in ("train", self.val_split):
            if split not in splits:
                continue
            self.rows[split] = rows = splits[split]
            if self.streaming:
                continue
            meta = rows.select_columns(_META_COLUMNS)
            records = [dict(r, row=n) for n, row in enumerate(meta) for r in expand_group(row, split)]
            self.records[split] = [dict(r, index=i) for i, r in enumerate(records)]
        if not self.streaming and not self.records["train"]:
            raise ValueError(f"{self.root} has no 'train' triplets")

    def _setup_jsonl(self) -> None:
        records = read_triplets(self.root)
        # one error for all missing or undecodable images, before any step runs (or a listed skip)
        where = {r[k]: f"triplets.jsonl triplet {n}" for n, r in enumerate(records, 1) for k in ("reference", "target")}
        records = self.usable_records(records, "image", where)
        for split in ("train", self.val_split):
            self.records[split] = [dict(r, index=i) for i, r in enumerate(x for x in records if x["split"] == split)]
        if not self.records["train"]:
            raise ValueError(f"{self.root}/triplets.jsonl has no 'train' triplets")

    # -- loaders -----------------------------------------------------------------------------------------
    def _transform(self, split: str) -> Transform:
        jitter = self.style_jitter if split == "train" else 0.0
        return StyleJitter(self.transform, jitter) if jitter else self.transform

    def _grouped(self, split: str, shuffle: bool, drop_last: bool) -> DataLoader:
        if self.streaming:
            return self._streamed(split, shuffle, drop_last)
        records = self.records[split]
        if split in self.rows:
            dataset: Dataset = ParquetTriplets(self.rows[split], records, self._transform(split))
        else:
            dataset = TripletDataset(records, self._transform(split))
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

    def _streamed(self, split: str, shuffle: bool, drop_last: bool) -> DataLoader:
        dataset = StreamingTriplets(
            self.rows[split],
            self._transform(split),
            split,
            self.batch_size,
            self.group_size,
            shuffle,
            drop_last,
            self.seed,
            self.shuffle_buffer,
        )
        return _EpochLoader(dataset, self.num_workers, self._prepare_stream)

    def _prepare_stream(self, dataset: StreamingTriplets, iterations: int) -> None:
        """The epoch (the trainer's, else the loader's count of iterations) and the DDP rank, before the workers
        start; under DDP also the batches every rank yields (the split's triplets are counted once)."""
        trainer = getattr(self, "trainer", None)
        dataset.set_epoch(trainer.current_epoch if trainer is not None else iterations)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dataset.rank, dataset.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if dataset.world_size > 1:
            if dataset.split not in self._num_triplets:
                rows = self.rows[dataset.split].select_columns(["triplets"])
                self._num_triplets[dataset.split] = sum(len(r["triplets"]) for r in rows)
            per_step = self.batch_size * dataset.world_size
            total = self._num_triplets[dataset.split]
            dataset.steps = total // per_step if dataset.drop_last else -(-total // per_step)

    def train_dataloader(self) -> DataLoader:
        return self._grouped("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not (self.records.get(self.val_split) or (self.streaming and self.val_split in self.rows)):
            return []
        return self._grouped(self.val_split, shuffle=False, drop_last=False)
