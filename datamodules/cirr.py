"""CIRR (Liu et al., ICCV 2021), read from the official layout::

    ROOT/cirr/captions/cap.rc2.{train,val,test1}.json
    ROOT/cirr/image_splits/split.rc2.{train,val,test1}.json    {"<name>": "./dev/<name>.png", ...}  (relative to ROOT)
    ROOT/train/<n>/*.png   ROOT/dev/*.png   ROOT/test1/*.png

The gallery of a split is the key set of its ``split.rc2.<split>.json`` (val 2,297 images, test1 2,315): the
image folders hold thousands more, which a folder listing would wrongly add. The reference image is always
removed from its query's ranking, as in every published CIRR number. test1 has no targets: it yields the two
upload files, no metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from coalign.evaluation.metrics import CIRREvaluator
from coalign.evaluation.submission import cirr_ranking_files

from .benchmark import BenchmarkDataModule, SplitData, read_json, require

__all__ = ["CIRRDataModule"]


class CIRRDataModule(BenchmarkDataModule):
    """CIRR train / val / test1.

    Args:
        root: folder holding ``cirr/`` (captions, image_splits) and the image folders ``train/``, ``dev/``,
            ``test1/``.
        labels: ``hard`` (default): Recall on ``target_hard`` (CLIP4Cir and nearly every paper); ``soft``: a
            query scores the best ``target_soft`` value in its top K (the CIRR authors' own evaluation).
        batch_size: queries (or images) per batch.
        num_workers: loader worker processes.
        image_transform: PIL -> tensor; None uses the attached model's ``preprocess``.
    """

    benchmark = "cirr"
    splits = ("train", "val", "test1")
    test_split = "test1"

    def __init__(
        self,
        root: str | Path,
        labels: Literal["hard", "soft"] = "hard",
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform=None,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, image_transform=image_transform)
        if labels not in ("hard", "soft"):
            raise ValueError(f"labels must be 'hard' or 'soft', got {labels!r}")
        self.labels = labels

    def _parse(self, split: str) -> SplitData:
        labelled = split != "test1"
        cap_path = self.root / "cirr" / "captions" / f"cap.rc2.{split}.json"
        split_path = self.root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
        entries = read_json(cap_path, "CIRR caption file")
        names = read_json(split_path, "CIRR split file")
        if not isinstance(entries, list):
            raise ValueError(f"{cap_path} should hold a JSON list, got {type(entries).__name__}")
        if not isinstance(names, dict):
            raise ValueError(f"{split_path} should map image names to paths, got {type(names).__name__}")
        paths: dict[str, Path] = {}
        for name, rel in names.items():
            if not isinstance(rel, str):
                raise ValueError(f"{split_path}: entry {name!r} should be a relative path, got {rel!r:.100}")
            paths[name] = self.root / rel
        keys: dict[str, Any] = {"pairid": int, "reference": str, "caption": str, "img_set": dict}
        if labelled:
            keys |= {"target_hard": str, "target_soft": dict}
        queries = []
        for i, entry in enumerate(entries):
            require(entry, keys, cap_path, i)
            members = entry["img_set"].get("members")
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise ValueError(f"{cap_path}: entry {i} needs img_set.members, a list of names: {entry!r:.300}")
            named = [entry["reference"], *members] + ([entry["target_hard"]] if labelled else [])
            unknown = [n for n in named if n not in paths]
            if unknown:
                raise ValueError(
                    f"{cap_path}: entry {i} (pairid {entry['pairid']}) names {unknown[0]!r}, "
                    f"which {split_path} does not list"
                )
            record = {
                "index": i,
                "reference": paths[entry["reference"]],
                "reference_id": entry["reference"],
                "target_id": entry["target_hard"] if labelled else "",
                "text": entry["caption"],
                "pairid": entry["pairid"],
                "subset_members": list(members),
            }
            if labelled:
                record["target_soft"] = {str(k): float(v) for k, v in entry["target_soft"].items()}
            queries.append(record)
        return SplitData(split, queries, list(paths.items()), has_labels=labelled, paths=paths)

    # -- evaluation --------------------------------------------------------------------------------------
    def build_evaluator(self, split: str) -> CIRREvaluator:
        data = self.split_data(split)
        return CIRREvaluator(data.gallery_ids, labels=self.labels, has_labels=data.has_labels)

    def protocol(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "labels": self.labels, "exclude_reference": True}

    def ranking_files(self, split: str, evaluator: CIRREvaluator) -> dict[str, dict]:
        return cirr_ranking_files(self.split_data(split), evaluator.rankings(), evaluator.subset_rankings())
