"""CIRCO (Baldrati et al., ICCV 2023): annotation parser, DataModule, evaluator, upload-file writer and checker.

Read from the official layout::

    ROOT/annotations/{val,test}.json
    ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json     {"images": [{"id", "file_name"}, ...]}
    ROOT/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg

The gallery is every image of ``image_info_unlabeled2017.json`` (123,403), shared by val and test, so a gallery
cache made for one serves the other. Queries may have several ground truths; the metric is mAP@k exactly as
the server computes it. Image ids are ints in the files and strings inside coalign (gallery names).

Metrics (percentages): ``AP@k = sum_{i<=k} P(i) * rel(i) / min(|gt|, k)`` on the top-50 list, ``mAP@k`` its
mean over queries (k = 5, 10, 25, 50); Recall@k on the single ``target_img_id``; mAP@10 per semantic aspect.

Upload format: ``circo_<split>.json``, one JSON object ``{"<query id>": [50 unique int image ids]}`` holding
every query of the split, at most 5 MB; one duplicate rejects the file.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coalign.evaluation.evaluator import RetrievalEvaluator
from coalign.evaluation.ranks import head, lookup_positions
from coalign.evaluation.submission import LIST_LENGTH, ProblemReport, check_list, ranking_of

from .benchmark import BenchmarkDataModule, SplitData, read_annotation, require

__all__ = ["CIRCODataModule", "CIRCOEvaluator", "circo_ranking_files", "check_circo"]

_TEMPLATE_FIELDS = {"caption", "shared_concept"}


# -- evaluation ------------------------------------------------------------------------------------------------
class CIRCOEvaluator(RetrievalEvaluator):
    """CIRCO mAP@{5,10,25,50} (the server's formula), Recall@k on ``target_img_id``, mAP@10 per aspect."""

    ks = (5, 10, 25, 50)
    value_names = tuple(f"circo/mAP@{k}" for k in ks) + tuple(f"circo/R@{k}" for k in ks)

    def __init__(
        self,
        gallery_ids: Sequence[str],
        aspects: Sequence[str] = (),
        *,
        exclude_reference: bool = False,
        has_labels: bool = True,
    ) -> None:
        super().__init__(
            gallery_ids, top_k=self.list_length, exclude_reference=exclude_reference, has_labels=has_labels
        )
        self.aspects = list(aspects)
        self.add_state("aspect_mask", default=[], dist_reduce_fx="cat")

    def _update(self, batch: dict[str, Any], positions: Tensor) -> None:
        ranking = head(positions, self.list_length)
        self.ranking.append(ranking)
        if not self.has_labels:
            return
        gt = lookup_positions(batch["gt_ids"], self.position, self.device, missing=-2)
        n_gt = torch.tensor([len(g) for g in batch["gt_ids"]], device=self.device, dtype=torch.float)
        relevant = ((ranking[:, :, None] == gt[:, None, :]) & (gt[:, None, :] >= 0)).any(-1) & (ranking >= 0)
        relevant = relevant.float()
        cutoff = torch.arange(1, ranking.shape[1] + 1, device=self.device, dtype=torch.float)
        precision = relevant.cumsum(dim=1) * relevant / cutoff
        target = lookup_positions(batch["target_id"], self.position, self.device, missing=-2)
        columns = [precision[:, :k].sum(dim=1) / n_gt.clamp(max=k) for k in self.ks]
        columns += [(ranking[:, :k] == target[:, None]).any(dim=1).float() for k in self.ks]
        self.values.append(torch.stack(columns, dim=1))
        mask = torch.zeros(len(ranking), len(self.aspects), dtype=torch.bool, device=self.device)
        for row, names in enumerate(batch["semantic_aspects"]):
            for name in names:
                mask[row, self.aspects.index(name)] = True
        self.aspect_mask.append(mask)

    def _metric_states(self) -> tuple[str, ...]:
        return ("values", "aspect_mask")

    def _metrics(self, states: dict[str, Tensor]) -> dict[str, float]:
        out = super()._metrics(states)
        ap10 = states["values"][:, self.ks.index(10)]
        for a, name in enumerate(self.aspects):
            rows = states["aspect_mask"][:, a]
            if rows.any():
                out[f"circo/aspect/{name}/mAP@10"] = float(ap10[rows].mean() * 100)
        return out


# -- upload files ----------------------------------------------------------------------------------------------
def circo_ranking_files(data: SplitData, rankings: dict[int, list[str]]) -> dict[str, dict]:
    """``circo_<split>.json``: query id -> 50 int image ids."""
    return {
        f"circo_{data.split}.json": {
            str(q["query_id"]): [int(i) for i in ranking_of(rankings, q)[:50]] for q in data.queries
        }
    }


def check_circo(obj: dict[str, Any], data: SplitData, report: ProblemReport) -> None:
    """Add to ``report`` the problems of a CIRCO upload for the split ``data`` (a JSON object; the size and the
    object itself are checked by ``BenchmarkDataModule.check_submission``)."""
    gallery = {int(i) for i in data.gallery_ids}
    queries = {str(q["query_id"]) for q in data.queries}
    for key in obj.keys() - queries:
        report.add(f"query ids not in {data.split}", key)
    for key in sorted(queries, key=int):
        if key not in obj:
            report.add("missing query ids", key)
        else:
            check_list(report, key, obj[key], min(LIST_LENGTH, len(gallery)), gallery, int)


# -- data module ----------------------------------------------------------------------------------------------
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
        image_transform: PIL -> tensor; None (the default) waits for ``connect(model.preprocess)``.
        skip_bad_images: drop (with a warning) what needs an image that is missing or cannot be decoded,
            instead of stopping before the first step (training split only for a benchmark).
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
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(
            root,
            batch_size=batch_size,
            num_workers=num_workers,
            image_transform=image_transform,
            skip_bad_images=skip_bad_images,
        )
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
            info = read_annotation(info_path, "CIRCO gallery file (COCO 2017 unlabeled image info)")
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
        entries = read_annotation(path, "CIRCO annotation file")
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

    def _check_upload(self, obj: dict[str, Any], data: SplitData, report: ProblemReport) -> None:
        check_circo(obj, data, report)
