"""Shared machinery of the three benchmark DataModules (FashionIQ, CIRR, CIRCO).

A benchmark split is parsed once into a :class:`SplitData`: its queries (one record per annotation entry, in
file order) and its gallery (``(image_id, path)`` pairs taken from the split/annotation files, never from a
folder listing). Parsing needs only the annotation files, so :meth:`BenchmarkDataModule.check_submission`
(``coalign check-submission``) works on a copy without images; :meth:`BenchmarkDataModule.prepare_split` adds
the image existence check that runs before any encoding.

Each benchmark's module holds everything of that benchmark: annotation parser, DataModule, evaluator, upload-file
writer and checker.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from coalign.evaluation.submission import MAX_BYTES, ProblemReport
from coalign.io import read_json

from .base import CIRDataModule, GalleryDataset, TripletDataset, load_image

__all__ = ["BenchmarkDataModule", "QueryDataset", "SplitData", "read_annotation", "require"]


def read_annotation(path: Path, what: str) -> Any:
    """Load an annotation file with :func:`coalign.io.read_json`; a missing one also hints at the layout."""
    try:
        return read_json(path, what)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (is root the folder of the official layout?)") from None


def require(entry: Any, types: dict[str, type | tuple[type, ...]], path: Path, index: int | str) -> dict:
    """Check that annotation ``entry`` is an object holding ``types``'s keys with those types."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: entry {index} should be a JSON object, got {type(entry).__name__}: {entry!r:.200}")
    for key, kind in types.items():
        if key not in entry:
            raise ValueError(f"{path}: entry {index} has no {key!r}: {json.dumps(entry)[:300]}")
        # bool is an int in Python; an id given as true/false is still malformed
        if not isinstance(entry[key], kind) or (isinstance(entry[key], bool) and bool not in _as_tuple(kind)):
            raise ValueError(
                f"{path}: entry {index} has {key!r} of type {type(entry[key]).__name__}, expected "
                f"{' or '.join(t.__name__ for t in _as_tuple(kind))}: {json.dumps(entry)[:300]}"
            )
    return entry


def _as_tuple(kind) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


class _DuplicateKeys(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of ``json.loads`` that refuses an object naming one key twice."""
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise _DuplicateKeys(sorted({k for k in keys if keys.count(k) > 1})[:5])
    return out


@dataclass
class SplitData:
    """A parsed split. ``queries[i]["index"] == i``; ``gallery`` lists ``(image_id, path)`` without duplicates."""

    split: str
    queries: list[dict[str, Any]]
    gallery: list[tuple[str, Path]]
    has_labels: bool
    paths: dict[str, Path] = field(default_factory=dict)  # every image the split names (gallery, references, ...)
    subsets: dict[str, list[str]] = field(default_factory=dict)  # named sub-galleries (FashionIQ's categories)

    @property
    def gallery_ids(self) -> list[str]:
        return [image_id for image_id, _ in self.gallery]


class QueryDataset(Dataset):
    """Evaluation queries: the reference image, the text(s) and every per-query label of the record.

    Keys of a record other than ``reference`` (a path) pass through to the batch unchanged, so benchmark labels
    such as ``subset_members`` or ``gt_ids`` reach the evaluator. Target images are not loaded: evaluation
    finds the target in the gallery.
    """

    def __init__(self, records: list[dict[str, Any]], transform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        item = {k: v for k, v in record.items() if k != "reference" and not k.startswith("_")}
        item["reference"] = self.transform(load_image(record["reference"]))
        item.setdefault("group", record["index"])
        return item


class BenchmarkDataModule(CIRDataModule):
    """Base of the benchmark DataModules: split parsing and caching, loaders, the evaluation protocol.

    Subclasses set ``benchmark``, ``splits``, ``test_split`` and ``train_split`` and implement ``_parse``,
    ``protocol``, ``build_evaluator``, ``ranking_files`` and, where a test server judges uploads,
    ``_check_upload`` (else they set ``has_test_server = False``).
    """

    benchmark: str = ""
    splits: tuple[str, ...] = ()
    test_split: str = "test"
    train_split: str | None = "train"
    has_gallery = True
    has_test_server = True

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform=None,
        skip_bad_images: bool = False,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_transform=image_transform,
            skip_bad_images=skip_bad_images,
        )
        self.root = Path(root).expanduser()
        self._cache: dict[str, SplitData] = {}
        self._checked: set[str] = set()

    # -- splits ------------------------------------------------------------------------------------------
    def check_split(self, split: str) -> str:
        """Return ``split`` if this benchmark has it, else raise an error listing the valid ones."""
        if split not in self.splits:
            raise ValueError(f"{self.benchmark} has no split {split!r}; valid splits: {', '.join(self.splits)}")
        return split

    def split_data(self, split: str) -> SplitData:
        """The parsed annotations of ``split`` (cached; reads no image)."""
        self.check_split(split)
        if split not in self._cache:
            self._cache[split] = self._parse(split)
        return self._cache[split]

    def prepare_split(self, split: str) -> SplitData:
        """Parse ``split`` and check that every image it names exists and decodes, before anything is encoded.

        ``skip_bad_images`` applies to the training split only (its queries that need a bad image are dropped):
        an evaluation split must stay whole for its metrics to compare with published ones.
        """
        data = self.split_data(split)
        if split in self._checked:
            return data
        what = f"{self.benchmark} {split} image"
        where = {str(p): f"image id {i!r}" for i, p in data.paths.items()}
        skip = self.skip_bad_images and split == self.train_split
        bad = self.check_images(sorted(set(where)), what, where, skip=skip)
        if bad:  # the training split under skip_bad_images
            bad_ids = {i for i, p in data.paths.items() if str(p) in bad}
            kept = [q for q in data.queries if str(q["reference"]) not in bad and q.get("target_id") not in bad_ids]
            warnings.warn(
                f"skip_bad_images: {len(bad)} {what} files are missing or cannot be decoded (e.g. "
                f"{', '.join(sorted(bad)[:3])}); dropped {len(data.queries) - len(kept)} of {len(data.queries)} "
                "training queries that need them",
                stacklevel=2,
            )
            data.queries = [dict(q, index=n) for n, q in enumerate(kept)]
        self._checked.add(split)
        return data

    def _parse(self, split: str) -> SplitData:
        raise NotImplementedError

    def evaluation_split(self, stage: str) -> str:
        if stage not in ("fit", "validate", "test"):
            raise ValueError(f"no evaluation split for stage {stage!r}; expected fit, validate or test")
        return self.test_split if stage == "test" else "val"

    def setup(self, stage: str | None = None) -> None:
        # parse and check the files of the splits this stage reads, so a missing image stops the run here
        splits = {"fit": [self.train_split, "val"], "validate": ["val"], "test": [self.test_split]}.get(stage or "", [])
        for split in splits:
            if split is not None:
                self.prepare_split(split)

    # -- datasets and loaders ----------------------------------------------------------------------------
    def query_dataset(self, split: str) -> Dataset:
        return QueryDataset(self.prepare_split(split).queries, self.transform)

    def gallery_dataset(self, split: str) -> Dataset:
        return GalleryDataset([(i, str(p)) for i, p in self.prepare_split(split).gallery], self.transform)

    def query_dataloader(self, split: str) -> DataLoader:
        """Loader over the queries of ``split`` (the batches ``val_dataloader`` / ``test_dataloader`` yield)."""
        return self._loader(self.query_dataset(split))

    def val_dataloader(self) -> DataLoader:
        return self.query_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.query_dataloader(self.test_split)

    def train_dataloader(self) -> DataLoader:
        if self.train_split is None:
            raise RuntimeError(f"{self.benchmark} has no training split")
        return self._loader(self.train_dataset(), shuffle=True)

    def train_dataset(self) -> TripletDataset:
        data = self.prepare_split(self.train_split)
        records = [{**q, "target": str(data.paths[q["target_id"]])} for q in data.queries]
        return TripletDataset(records, self.transform, text_fn=self._train_text)

    def _train_text(self, record: dict[str, Any], index: int) -> str:
        return record["text"]

    # -- evaluation protocol -----------------------------------------------------------------------------
    def protocol(self) -> dict[str, Any]:
        """The protocol options that produced a result, recorded in ``metrics.json`` as ``protocol/<name>``."""
        return {"benchmark": self.benchmark}

    def ranking_files(self, split: str, evaluator) -> dict[str, dict]:
        """The rankings of a finished evaluation in the official upload format(s): file name -> JSON object."""
        raise NotImplementedError

    # -- upload files ------------------------------------------------------------------------------------
    def check_submission(self, path: str | Path, split: str | None = None) -> list[str]:
        """Judge an upload file as the benchmark's test server would; reads annotations only, no image.

        Args:
            path: the JSON file to upload.
            split: the split it ranks; None means ``test_split``.

        Returns:
            Every problem found, one line per kind of problem (``"<kind>: <count> (e.g. ...)"``); an empty list
            means the file passes. A file that is not JSON gives one line.

        Raises:
            ValueError: the benchmark has no test server, or ``split`` is not one of its splits.
            FileNotFoundError: ``path`` (or an annotation file of the split) does not exist.
        """
        if not self.has_test_server:
            raise ValueError(f"no test server checks {self.benchmark} files; valid benchmarks: cirr, circo")
        data = self.split_data(self.test_split if split is None else split)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"submission file not found: {path}")
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # not JSON: a problem of the file, not of the check
            return [f"{path} is not valid JSON (UTF-8 expected): {err}"]
        except _DuplicateKeys as err:  # the server's JSON parser would keep only one of them
            return [f"{path}: the key(s) {err.args[0]} appear more than once in one object"]
        except RecursionError:
            return [f"{path} is nested too deeply to be an upload file (an object of lists is expected)"]
        report = ProblemReport()
        size = path.stat().st_size
        if size > MAX_BYTES:
            report.add(f"file larger than {MAX_BYTES} bytes", str(size))
        if not isinstance(obj, dict):
            return [f"the file must hold one JSON object, got {type(obj).__name__}"]
        self._check_upload(obj, data, report)
        return report.lines()

    def _check_upload(self, obj: dict[str, Any], data: SplitData, report: ProblemReport) -> None:
        """Add to ``report`` the problems of the parsed upload object ``obj`` for the split ``data``."""
        raise NotImplementedError(f"{type(self).__name__} does not check upload files")
