"""CIRR (Liu et al., ICCV 2021): annotation parser, DataModule, evaluator, upload-file writer and checker.

Read from the official layout::

    ROOT/cirr/captions/cap.rc2.{train,val,test1}.json
    ROOT/cirr/image_splits/split.rc2.{train,val,test1}.json    {"<name>": "./dev/<name>.png", ...}  (relative to ROOT)
    ROOT/train/<n>/*.png   ROOT/dev/*.png   ROOT/test1/*.png

The gallery of a split is the key set of its ``split.rc2.<split>.json`` (val 2,297 images, test1 2,315): the
image folders hold thousands more, which a folder listing would wrongly add. The reference image is always
removed from its query's ranking, as in every published CIRR number. test1 has no targets: it yields the two
upload files, no metrics.

Metrics (percentages): Recall@{1,5,10,50} with the reference removed; Recall_subset@{1,2,3} over the image
set's other five members in their global order; ``Avg = (R@5 + Rs@1) / 2``. Soft labels score a query by the
best ``target_soft`` value in its top K, floored at 0 (the CIRR authors' evaluation).

Upload format (one JSON object per file, at most 5 MB): ``{"version": "rc2", "metric": "recall", "<pairid>":
[top-50 names]}`` in ``cirr_<split>_recall.json``, and the same with ``"metric": "recall_subset"`` and the top 3
of the image set in ``cirr_<split>_recall_subset.json``; every pairid present, reference excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from coalign.evaluation.evaluator import RetrievalEvaluator
from coalign.evaluation.ranks import BIG, head, lookup_positions, rank_lookup
from coalign.evaluation.submission import LIST_LENGTH, ProblemReport, check_list, ranking_of

from .benchmark import BenchmarkDataModule, SplitData, read_annotation, require

__all__ = ["CIRRDataModule", "CIRREvaluator", "cirr_ranking_files", "check_cirr"]


# -- evaluation ------------------------------------------------------------------------------------------------
class CIRREvaluator(RetrievalEvaluator):
    """CIRR Recall@K and Recall_subset@K with the reference removed (always), hard or soft labels.

    Ranks the whole gallery: the subset order needs the global rank of every image-set member.
    """

    value_names = ("cirr/R@1", "cirr/R@5", "cirr/R@10", "cirr/R@50", "cirr/Rs@1", "cirr/Rs@2", "cirr/Rs@3")
    ks = (1, 5, 10, 50)
    subset_ks = (1, 2, 3)

    def __init__(self, gallery_ids: Sequence[str], *, labels: str = "hard", has_labels: bool = True) -> None:
        if labels not in ("hard", "soft"):
            raise ValueError(f"labels must be 'hard' or 'soft', got {labels!r}")
        super().__init__(gallery_ids, top_k=len(gallery_ids), exclude_reference=True, has_labels=has_labels)
        self.labels = labels
        self.add_state("subset_ranking", default=[], dist_reduce_fx="cat")

    def _update(self, batch: dict[str, Any], positions: Tensor) -> None:
        rank_of = rank_lookup(positions, len(self.gallery_ids))  # [B, n] rank of each gallery image, BIG = absent
        members = [
            [m for m in row if m != ref]
            for row, ref in zip(batch["subset_members"], batch["reference_id"], strict=True)
        ]
        member_pos = lookup_positions(members, self.position, self.device)
        member_rank = torch.where(member_pos >= 0, rank_of.gather(1, member_pos.clamp(min=0)), BIG)
        order = torch.argsort(member_rank, dim=1, stable=True)
        subset = torch.where(member_rank.gather(1, order) < BIG, member_pos.gather(1, order), -1)
        self.ranking.append(head(positions, self.list_length))
        self.subset_ranking.append(head(subset, 3))
        if not self.has_labels:
            return
        if self.labels == "hard":
            label_pos = lookup_positions(batch["target_id"], self.position, self.device, missing=-2)[:, None]
            label_val = torch.ones_like(label_pos, dtype=torch.float)
        else:
            soft = [dict(d) for d in batch["target_soft"]]
            label_pos = lookup_positions([list(d) for d in soft], self.position, self.device, missing=-2)
            width = label_pos.shape[1]
            label_val = torch.tensor([list(d.values()) + [0.0] * (width - len(d)) for d in soft], device=self.device)
        global_rank = torch.where(label_pos >= 0, rank_of.gather(1, label_pos.clamp(min=0)), BIG)
        match = (subset[:, :, None] == label_pos[:, None, :]) & (label_pos[:, None, :] >= 0)  # [B, 5, S]
        subset_rank = torch.where(match.any(1), match.float().argmax(1), BIG)
        columns = [self._score(global_rank, label_val, k) for k in self.ks]
        columns += [self._score(subset_rank, label_val, k) for k in self.subset_ks]
        self.values.append(torch.stack(columns, dim=1))

    @staticmethod
    def _score(rank: Tensor, value: Tensor, k: int) -> Tensor:
        """Best label value among the labels ranked in the top k, floored at 0 (hard labels: 0/1 hit)."""
        return torch.where(rank < k, value, torch.zeros_like(value)).amax(dim=1).clamp(min=0)

    def _metrics(self, states: dict[str, Tensor]) -> dict[str, float]:
        out = super()._metrics(states)
        out["cirr/Avg"] = (out["cirr/R@5"] + out["cirr/Rs@1"]) / 2
        return out

    def subset_rankings(self) -> dict[int, list[str]]:
        """Query index -> its top-3 among the image-set members other than the reference."""
        return self._names("subset_ranking")


# -- upload files ----------------------------------------------------------------------------------------------
def cirr_ranking_files(
    data: SplitData, rankings: dict[int, list[str]], subset_rankings: dict[int, list[str]]
) -> dict[str, dict]:
    """``cirr_<split>_recall.json`` (top 50) and ``cirr_<split>_recall_subset.json`` (top 3 of the set)."""
    recall: dict[str, Any] = {"version": "rc2", "metric": "recall"}
    subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
    for q in data.queries:
        recall[str(q["pairid"])] = ranking_of(rankings, q)[:50]
        subset[str(q["pairid"])] = ranking_of(subset_rankings, q)[:3]
    return {f"cirr_{data.split}_recall.json": recall, f"cirr_{data.split}_recall_subset.json": subset}


def check_cirr(obj: dict[str, Any], data: SplitData, report: ProblemReport) -> None:
    """Add to ``report`` the problems of a CIRR upload (``recall`` or ``recall_subset``) for the split ``data``
    (a JSON object; its size and type are checked by ``BenchmarkDataModule.check_submission``)."""
    if obj.get("version") != "rc2":
        report.add('"version" is not "rc2"', repr(obj.get("version")))
    metric = obj.get("metric")
    if metric not in ("recall", "recall_subset"):
        report.add('"metric" is not "recall" or "recall_subset"', repr(metric))
    gallery = set(data.gallery_ids)
    queries = {str(q["pairid"]): q for q in data.queries}
    for key in obj.keys() - queries.keys() - {"version", "metric"}:
        report.add(f"pairids not in {data.split}", key)
    for key, q in queries.items():
        if key not in obj:
            report.add("missing pairids", key)
            continue
        ref = q["reference_id"]
        if metric == "recall_subset":
            members = [m for m in q["subset_members"] if m != ref]
            value = check_list(report, key, obj[key], min(3, len(members)), set(members) | {ref}, str)
            if value is not None and any(v not in members and v != ref for v in value):
                report.add("subset entries outside the query's image set", key)
        else:
            value = check_list(report, key, obj[key], min(LIST_LENGTH, len(gallery) - 1), gallery, str)
        if value is not None and ref in value:
            report.add("reference image not excluded", key)


# -- data module ----------------------------------------------------------------------------------------------
class CIRRDataModule(BenchmarkDataModule):
    """CIRR train / val / test1.

    **Training groups are CIRR's image sets.** Every CIRR pair is drawn from an image set of six similar images
    (``img_set.id`` in the caption files), so the pairs of one set form a group: the training loader keeps up to
    ``group_size`` pairs of a set together in a batch, and the global contextual alignment loss treats the other
    targets of the set as soft positives (never a query's own reference image, see
    :func:`coalign.heads.soft_positive_targets`).

    Args:
        root: folder holding ``cirr/`` (captions, image_splits) and the image folders ``train/``, ``dev/``,
            ``test1/``.
        labels: ``hard`` (default): Recall on ``target_hard`` (CLIP4Cir and nearly every paper); ``soft``: a
            query scores the best ``target_soft`` value in its top K (the CIRR authors' own evaluation).
        batch_size: queries (or images) per batch; for training, a multiple of ``group_size``.
        num_workers: loader worker processes.
        image_transform: PIL -> tensor; None (the default) waits for ``connect(model.preprocess)``.
        skip_bad_images: drop (with a warning) what needs an image that is missing or cannot be decoded,
            instead of stopping before the first step (training split only for a benchmark).
        group_size: training pairs of one image set kept together in a batch (1: plain shuffled batches).
        seed: seed of the per-epoch shuffles of the grouped training batches.
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
        skip_bad_images: bool = False,
        group_size: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root,
            batch_size=batch_size,
            num_workers=num_workers,
            image_transform=image_transform,
            skip_bad_images=skip_bad_images,
        )
        if labels not in ("hard", "soft"):
            raise ValueError(f"labels must be 'hard' or 'soft', got {labels!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.labels = labels
        self.group_size = group_size
        self.seed = seed

    def _parse(self, split: str) -> SplitData:
        labelled = split != "test1"
        cap_path = self.root / "cirr" / "captions" / f"cap.rc2.{split}.json"
        split_path = self.root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
        entries = read_annotation(cap_path, "CIRR caption file")
        names = read_annotation(split_path, "CIRR split file")
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
            set_id = entry["img_set"].get("id")
            if isinstance(set_id, int) and not isinstance(set_id, bool):
                record["group"] = set_id  # the image set: the training group (soft positives)
            elif split == self.train_split:
                raise ValueError(f"{cap_path}: entry {i} needs img_set.id, an integer (its image set): {entry!r:.300}")
            queries.append(record)
        return SplitData(split, queries, list(paths.items()), has_labels=labelled, paths=paths)

    # -- training ----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches holding up to ``group_size`` pairs of one image set together."""
        if self.batch_size % self.group_size:  # checked here: evaluation takes any batch size
            raise ValueError(
                f"CIRR training needs batch_size ({self.batch_size}) to be a multiple of group_size "
                f"({self.group_size}): change one of them (--data.batch_size, --data.group_size)"
            )
        dataset = self.train_dataset()
        return self.grouped_loader(dataset, [r["group"] for r in dataset.records], self.group_size, self.seed)

    # -- evaluation --------------------------------------------------------------------------------------
    def build_evaluator(self, split: str) -> CIRREvaluator:
        data = self.split_data(split)
        return CIRREvaluator(data.gallery_ids, labels=self.labels, has_labels=data.has_labels)

    def protocol(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "labels": self.labels, "exclude_reference": True}

    def ranking_files(self, split: str, evaluator: CIRREvaluator) -> dict[str, dict]:
        return cirr_ranking_files(self.split_data(split), evaluator.rankings(), evaluator.subset_rankings())

    def _check_upload(self, obj: dict[str, Any], data: SplitData, report: ProblemReport) -> None:
        check_cirr(obj, data, report)
