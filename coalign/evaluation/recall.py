"""Recall@K of a single target per query: the metric of the procedural Shapes benchmark and of user triplets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TargetRecall"]


class TargetRecall(Metric):
    """Percentage of queries whose ``target_id`` is among the first K ranked gallery ids.

    States are sums, so the metric syncs across DDP ranks by summation.

    Args:
        ks: the cut-offs K.
        prefix: prepended to the metric names (``"shapes/"`` gives ``"shapes/R@1"``).
        exclude_reference: remove each query's reference image from its ranking before scoring.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10, 50), prefix: str = "", exclude_reference: bool = False):
        super().__init__()
        self.ks = tuple(int(k) for k in ks)
        self.top_k = max(self.ks)
        self.prefix = prefix
        self.exclude_reference = exclude_reference
        self.add_state("hits", default=torch.zeros(len(self.ks)), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, batch: dict, ranked_ids: Sequence[Sequence[str]], ranked_scores: Tensor | None = None) -> None:
        targets = batch["target_id"]
        if len(targets) != len(ranked_ids):
            raise ValueError(f"got {len(ranked_ids)} rankings for {len(targets)} queries")
        for target, ranking in zip(targets, ranked_ids):
            ranking = list(ranking)
            position = ranking.index(target) if target in ranking else len(ranking) + 1
            self.hits += torch.tensor([float(position < k) for k in self.ks], device=self.hits.device)
        self.count += len(targets)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("TargetRecall.compute() called before any update")
        recall = 100.0 * self.hits / self.count
        return {f"{self.prefix}R@{k}": float(v) for k, v in zip(self.ks, recall)}
