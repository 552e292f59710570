"""Benchmark evaluators: ``torchmetrics.Metric`` classes that turn rankings into the official metrics.

An evaluator is built by a DataModule's ``build_evaluator(split)`` and fed, batch after batch, with the query
batch and the ranked gallery for each query. It keeps only small tensors as state (per-query hit values and
the head of each ranking, as gallery positions), so DDP ranks sync by concatenation and the same state also
yields the submission files (:meth:`RetrievalEvaluator.rankings`): the numbers in ``metrics.json`` and the
uploaded rankings come from one source.

Metric definitions (percentages):

* FashionIQ: Recall@10/50 per category on the category's own gallery, their means over categories, and
  ``fashioniq/avg = (avg R@10 + avg R@50) / 2``.
* CIRR: Recall@{1,5,10,50} with the reference removed; Recall_subset@{1,2,3} over the image set's other five
  members in their global order; ``Avg = (R@5 + Rs@1) / 2``. Soft labels score a query by the best
  ``target_soft`` value in its top K, floored at 0 (the CIRR authors' evaluation).
* CIRCO: ``AP@k = sum_{i<=k} P(i) * rel(i) / min(|gt|, k)`` on the top-50 list, ``mAP@k`` its mean; Recall@k
  on the single ``target_img_id``; mAP@10 per semantic aspect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ._ranks import BIG, compact, head, lookup_positions, rank_lookup, to_positions

__all__ = ["RetrievalEvaluator", "FashionIQEvaluator", "CIRREvaluator", "CIRCOEvaluator"]


def _cat(state: Any) -> Tensor:
    """A list state (before sync) or a tensor (after torchmetrics concatenated it) as one tensor."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if len(state) else torch.empty(0)


class RetrievalEvaluator(Metric):
    """Common state and ranking handling of the benchmark evaluators.

    Attributes:
        gallery_ids: gallery image names; positions in rankings refer to this order.
        top_k: ranking length ``update`` needs (the whole gallery where a metric depends on deep ranks).
        exclude_reference: remove each query's reference image from its ranking.
        has_labels: False for test splits: ``compute`` returns no metric, only rankings are kept.
        query_text_keys: batch keys whose texts are encoded and averaged into one query (FashionIQ's
            ``both_orders`` needs two); ``update`` checks that the caller encoded exactly these.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    list_length = 50  # the official upload length
    value_names: tuple[str, ...] = ()

    def __init__(
        self,
        gallery_ids: Sequence[str],
        *,
        top_k: int,
        exclude_reference: bool,
        has_labels: bool = True,
        query_text_keys: Sequence[str] = ("text",),
    ) -> None:
        super().__init__()
        self.gallery_ids = [str(i) for i in gallery_ids]
        self.position = {name: i for i, name in enumerate(self.gallery_ids)}
        if len(self.position) != len(self.gallery_ids):
            raise ValueError("gallery ids must be unique")
        if not self.gallery_ids:
            raise ValueError("the gallery is empty")
        self.top_k = int(top_k)
        self.exclude_reference = bool(exclude_reference)
        self.has_labels = bool(has_labels)
        self.query_text_keys = tuple(query_text_keys)
        self.add_state("query_index", default=[], dist_reduce_fx="cat")
        self.add_state("ranking", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    # -- update ------------------------------------------------------------------------------------------
    def update(
        self,
        batch: dict[str, Any],
        ranked_ids: Sequence[Sequence[str]] | Tensor,
        ranked_scores: Tensor | None = None,
        *,
        query_text_keys: Sequence[str] = ("text",),
    ) -> None:
        """Add one batch of queries.

        Args:
            batch: the query batch (``reference_id``, ``target_id``, ``index`` and the benchmark's label keys).
            ranked_ids: per query, gallery names best first, or a long tensor ``[B, L]`` of positions into
                ``gallery_ids`` (-1 = no entry), as :func:`coalign.evaluation.evaluation_step` passes.
            ranked_scores: unused (rankings are already ordered); accepted for the common signature.
            query_text_keys: the batch keys whose texts produced the query features.
        """
        if tuple(query_text_keys) != self.query_text_keys:
            raise ValueError(
                f"this evaluator expects queries encoded from {self.query_text_keys} (averaged), got "
                f"{tuple(query_text_keys)}: rank with coalign.evaluation.evaluation_step, which encodes them"
            )
        positions = to_positions(ranked_ids, self.position, self.device)
        n = len(batch["reference_id"])
        if positions.shape[0] != n:
            raise ValueError(f"got rankings for {positions.shape[0]} queries in a batch of {n}")
        if self.exclude_reference:
            reference = lookup_positions(batch["reference_id"], self.position, self.device)
            positions = compact(positions, keep=(positions >= 0) & (positions != reference[:, None]))
        index = torch.as_tensor(batch["index"], dtype=torch.long, device=self.device).view(-1)
        self.query_index.append(index)
        self._update(batch, positions)

    def _update(self, batch: dict[str, Any], positions: Tensor) -> None:
        raise NotImplementedError

    # -- results -----------------------------------------------------------------------------------------
    def _final_states(self, names: Sequence[str]) -> dict[str, Tensor]:
        """States ``names`` with one row per query, ordered by query index (DDP padding duplicates dropped)."""
        index = _cat(self.query_index).to(torch.long)
        order = torch.argsort(index, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        keep = order[first]
        out = {"query_index": index[keep]}
        for name in names:
            value = _cat(getattr(self, name))
            out[name] = value[keep] if value.numel() else value
        return out

    def compute(self) -> dict[str, float]:
        if not self.has_labels or not len(self.query_index):
            return {}
        return self._metrics(self._final_states(self._metric_states()))

    def _metric_states(self) -> tuple[str, ...]:
        return ("values",)

    def _metrics(self, states: dict[str, Tensor]) -> dict[str, float]:
        means = states["values"].float().mean(dim=0) * 100
        return {name: float(v) for name, v in zip(self.value_names, means)}

    def _names(self, state: str) -> dict[int, list[str]]:
        with self.sync_context():
            states = self._final_states([state])
        return {
            int(q): [self.gallery_ids[p] for p in row if p >= 0]
            for q, row in zip(states["query_index"].tolist(), states[state].tolist())
        }

    def rankings(self) -> dict[int, list[str]]:
        """Query index -> its top-50 gallery names (reference removed where the protocol removes it)."""
        return self._names("ranking")


class FashionIQEvaluator(RetrievalEvaluator):
    """FashionIQ Recall@10/50, each query ranked within its own category's gallery.

    Args:
        gallery_ids: union of the category galleries (the gallery loader's order).
        category_galleries: category -> names of its gallery.
        exclude_reference: remove the reference image from the ranking (off in the CLIP4Cir convention).
        has_labels: False for the test split.
        query_text_keys: ``("text",)``, or ``("text", "text_reversed")`` for ``caption_join="both_orders"``.
    """

    value_names = ("R@10", "R@50")

    def __init__(
        self,
        gallery_ids: Sequence[str],
        category_galleries: dict[str, Sequence[str]],
        *,
        exclude_reference: bool = False,
        has_labels: bool = True,
        query_text_keys: Sequence[str] = ("text",),
    ) -> None:
        n = len(gallery_ids)
        membership = torch.zeros(len(category_galleries), n, dtype=torch.bool)
        position = {str(name): i for i, name in enumerate(gallery_ids)}
        for c, names in enumerate(category_galleries.values()):
            membership[c, [position[str(name)] for name in names]] = True
        # a category ranked inside a larger union gallery needs the full ranking to find its own top 50 exactly
        whole = bool(membership.all())
        super().__init__(
            gallery_ids,
            top_k=self.list_length if whole else n,
            exclude_reference=exclude_reference,
            has_labels=has_labels,
            query_text_keys=query_text_keys,
        )
        self.categories = list(category_galleries)
        self.register_buffer("membership", membership, persistent=False)
        self.add_state("category", default=[], dist_reduce_fx="cat")

    def _update(self, batch: dict[str, Any], positions: Tensor) -> None:
        try:
            category = torch.tensor([self.categories.index(c) for c in batch["category"]], device=self.device)
        except ValueError as err:
            raise ValueError(f"query category not among {self.categories}: {err}") from None
        allowed = self.membership[category].gather(1, positions.clamp(min=0)) & (positions >= 0)
        ranking = head(compact(positions, allowed), self.list_length)
        self.ranking.append(ranking)
        self.category.append(category)
        if self.has_labels:
            target = lookup_positions(batch["target_id"], self.position, self.device, missing=-2)
            hits = ranking == target[:, None]
            self.values.append(torch.stack([hits[:, :10].any(1), hits[:, :50].any(1)], dim=1).float())

    def _metric_states(self) -> tuple[str, ...]:
        return ("values", "category")

    def _metrics(self, states: dict[str, Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        per_category = []
        for c, name in enumerate(self.categories):
            rows = states["values"][states["category"] == c]
            if len(rows):
                r10, r50 = (rows.mean(dim=0) * 100).tolist()
                out[f"fashioniq/{name}/R@10"], out[f"fashioniq/{name}/R@50"] = r10, r50
                per_category.append((r10, r50))
        if per_category:
            avg10 = sum(r[0] for r in per_category) / len(per_category)
            avg50 = sum(r[1] for r in per_category) / len(per_category)
            out.update({"fashioniq/avg/R@10": avg10, "fashioniq/avg/R@50": avg50, "fashioniq/avg": (avg10 + avg50) / 2})
        return out


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
