"""CIRCO (Baldrati et al., ICCV 2023), read from the official layout::

    ROOT/annotations/{val,test}.json
    ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json     {"images": [{"id", "file_name"}, ...]}
    ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg

The gallery is every image of ``image_info_unlabeled2017.json`` (123,403), shared by val and test, so a gallery
cache made for one serves the other. Queries may have several ground truths; the metric is mAP@k exactly as
the server computes it. Image ids are ints in the files and strings inside coalign (gallery names).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from coalign.evaluation.metrics import CIRCOEvaluator
from coalign.evaluation.submission import circo_ranking_files

from .benchmark import BenchmarkDataModule, SplitData, read_json, require

__all__ = ["CIRCODataModule"]

_TEMPLATE_FIELDS = {"caption", "shared_concept"}


class CIRCODataModule(BenchmarkDataModule):
    """CIRCO val / test.

    Args:
        root: folder holding ``annotations/`` and ``COCO2017_unlabeled/``.
        query_template: how the query text is built, a format string over ``{caption}`` (the relative caption)
            and ``{shared_concept}``. Default ``"{caption}"`` (the caption alone); seen elsewhere:
            ``"a photo of $ that {caption}"``, ``"find {shared_concept} but {caption}"``.
        exclude_reference: remove each query's reference image from its ranking (default False: the server
            does not remove it).
        batch_size: queries (or images) per batch.
        num_workers: loader worker processes.
        image_transform: PIL -> tensor; None uses the attached model's ``preprocess``.
    """

    benchmark = "circo"
    splits = ("val", "test")
    test_split = "test"
    train_split = None

    def __init__(
        self,
        root: str | Path,
        query_template: str = "{caption}",
        exclude_reference: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        image_transform=None,
    ) -> None:
        super().__init__(root, batch_size=batch_size, num_workers=num_workers, image_transform=image_transform)
        fields = {f for _, f, _, _ in string.Formatter().parse(query_template) if f is not None}
        if not fields <= _TEMPLATE_FIELDS or "caption" not in fields:
            raise ValueError(
                f"query_template {query_template!r} must use {{caption}} and may use {{shared_concept}}; "
                f"unknown fields: {sorted(fields - _TEMPLATE_FIELDS)}"
            )
        self.query_template = query_template
        self.exclude_reference = exclude_reference
        self._gallery: tuple[list[tuple[str, Path]], dict[str, Path]] | None = None

    def _read_gallery(self) -> tuple[list[tuple[str, Path]], dict[str, Path]]:
        if self._gallery is None:
            info_path = self.root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
            info = read_json(info_path, "CIRCO gallery file (COCO 2017 unlabeled image info)")
            if not isinstance(info, dict) or not isinstance(info.get("images"), list):
                raise ValueError(f"{info_path} should hold an object with an 'images' list")
            folder = self.root / "COCO2017_unlabeled" / "unlabeled2017"
            gallery = []
            for i, image in enumerate(info["images"]):
                require(image, {"id": int, "file_name": str}, info_path, f"images[{i}]")
                gallery.append((str(image["id"]), folder / image["file_name"]))
            if len({g[0] for g in gallery}) != len(gallery):
                raise ValueError(f"{info_path} lists an image id twice")
            self._gallery = (gallery, dict(gallery))
        return self._gallery

    def _parse(self, split: str) -> SplitData:
        labelled = split == "val"
        gallery, by_id = self._read_gallery()
        path = self.root / "annotations" / f"{split}.json"
        entries = read_json(path, "CIRCO annotation file")
        if not isinstance(entries, list):
            raise ValueError(f"{path} should hold a JSON list, got {type(entries).__name__}")
        keys: dict[str, Any] = {"id": int, "reference_img_id": int, "relative_caption": str, "shared_concept": str}
        if labelled:
            keys |= {"target_img_id": int, "gt_img_ids": list, "semantic_aspects": list}
        queries = []
        for i, entry in enumerate(entries):
            require(entry, keys, path, i)
            ref = str(entry["reference_img_id"])
            if ref not in by_id:
                raise ValueError(f"{path}: entry {i} (id {entry['id']}) has reference_img_id {ref}, not in the gallery")
            record = {
                "index": i,
                "reference": by_id[ref],
                "reference_id": ref,
                "target_id": str(entry["target_img_id"]) if labelled else "",
                "text": self.query_template.format(
                    caption=entry["relative_caption"], shared_concept=entry["shared_concept"]
                ),
                "query_id": entry["id"],
                "shared_concept": entry["shared_concept"],
            }
            if labelled:
                gt = entry["gt_img_ids"]
                if not gt or not all(isinstance(g, int) for g in gt):
                    raise ValueError(f"{path}: entry {i} (id {entry['id']}) needs a non-empty gt_img_ids list of ints")
                record["gt_ids"] = [str(g) for g in gt]
                record["semantic_aspects"] = [str(a) for a in entry["semantic_aspects"]]
            queries.append(record)
        return SplitData(split, queries, gallery, has_labels=labelled, paths=by_id)

    # -- evaluation --------------------------------------------------------------------------------------
    def build_evaluator(self, split: str) -> CIRCOEvaluator:
        data = self.split_data(split)
        aspects = sorted({a for q in data.queries for a in q.get("semantic_aspects", [])})
        return CIRCOEvaluator(
            data.gallery_ids, aspects, exclude_reference=self.exclude_reference, has_labels=data.has_labels
        )

    def protocol(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "query_template": self.query_template,
            "exclude_reference": self.exclude_reference,
        }

    def ranking_files(self, split: str, evaluator: CIRCOEvaluator) -> dict[str, dict]:
        return circo_ranking_files(self.split_data(split), evaluator.rankings())
