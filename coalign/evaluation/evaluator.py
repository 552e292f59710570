"""The evaluator contract: ``torchmetrics.Metric`` classes that turn rankings into metrics and upload rankings.

An evaluator is built by a DataModule's ``build_evaluator(split)`` for one gallery and fed, batch after batch,
with the query batch and the ranked gallery of each query. Every evaluator is a :class:`RetrievalEvaluator`:

* attributes ``gallery_ids``, ``top_k``, ``exclude_reference``, ``has_labels`` and ``query_text_keys`` tell
  the ranking engine what to rank and how to encode the queries;
* :meth:`~RetrievalEvaluator.check_gallery` checks, once per evaluation, that the encoded gallery is this
  evaluator's (same ids, same order);
* :meth:`~RetrievalEvaluator.update` takes rankings as gallery positions (a long tensor ``[B, L]``, -1 = no
  entry) or as gallery names;
* :meth:`~RetrievalEvaluator.compute` gives the metrics (percentages), :meth:`~RetrievalEvaluator.rankings`
  the head of every query's ranking (the upload files of a benchmark).

State is only small tensors (per-query values and the head of each ranking, as gallery positions), so DDP ranks
sync by concatenation, and queries a ``DistributedSampler`` repeated to even out ranks count once.

The official benchmarks' evaluators live with their DataModules (``coalign.datamodules.cirr`` ...);
:class:`TargetRecall` here is the single-target Recall@K of the Shapes benchmark and of user triplets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from .ranks import compact, head, lookup_positions, to_positions
from .submission import LIST_LENGTH

__all__ = ["RetrievalEvaluator", "TargetRecall"]


def _cat(state: Any) -> Tensor:
    """A list state (before sync) or a tensor (after torchmetrics concatenated it) as one tensor."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if len(state) else torch.empty(0)


class RetrievalEvaluator(Metric):
    """Base of every evaluator: gallery bookkeeping, ranking handling, DDP-safe per-query state.

    Subclasses implement ``_update(batch, positions)``, which appends to the ``ranking`` state (and, on labelled
    splits, to ``values``: one row of metric values per query), and name the columns of ``values`` in
    ``value_names`` or override ``_metrics``.

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
    list_length = LIST_LENGTH  # the official upload length
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

    def check_gallery(self, ids: Sequence[str]) -> None:
        """Raise ``ValueError`` unless ``ids`` (an encoded gallery's names, in order) are ``gallery_ids``."""
        if [str(i) for i in ids] != self.gallery_ids:
            raise ValueError("the gallery was not encoded from this evaluator's split (ids or order differ)")

    # -- update ------------------------------------------------------------------------------------------
    def update(
        self,
        batch: dict[str, Any],
        ranked: Sequence[Sequence[str]] | Tensor,
        ranked_scores: Tensor | None = None,
        *,
        query_text_keys: Sequence[str] = ("text",),
    ) -> None:
        """Add one batch of queries.

        Args:
            batch: the query batch (``reference_id``, ``target_id``, ``index`` and the benchmark's label keys).
            ranked: a long tensor ``[B, L]`` of positions into ``gallery_ids`` (-1 = no entry), best first, as
                :func:`coalign.evaluation.evaluation_step` passes; or, per query, gallery names best first.
            ranked_scores: unused (rankings are already ordered); accepted for the common signature.
            query_text_keys: the batch keys whose texts produced the query features.
        """
        if tuple(query_text_keys) != self.query_text_keys:
            raise ValueError(
                f"this evaluator expects queries encoded from {self.query_text_keys} (averaged), got "
                f"{tuple(query_text_keys)}: rank with coalign.evaluation.evaluation_step, which encodes them"
            )
        positions = to_positions(ranked, self.position, self.device)
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
        """The metrics in percent (keys such as ``"cirr/R@1"``); empty for a split without labels."""
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
        """Query index -> the head of its ranking as gallery names (reference removed where the protocol does)."""
        return self._names("ranking")


class TargetRecall(RetrievalEvaluator):
    """Percentage of queries whose ``target_id`` is among the first K ranked gallery images.

    The metric of the procedural Shapes benchmark and of user triplets: one target per query, named
    ``f"{prefix}R@{k}"``. A target that is empty or not in the gallery is never hit.

    Args:
        gallery_ids: gallery image names, in the gallery loader's order.
        ks: the cut-offs K; the ranking length needed is ``max(ks)``.
        prefix: prepended to the metric names (``"shapes/"`` gives ``"shapes/R@1"``).
        exclude_reference: remove each query's reference image from its ranking before scoring.
    """

    def __init__(
        self,
        gallery_ids: Sequence[str],
        ks: Sequence[int] = (1, 5, 10, 50),
        prefix: str = "",
        exclude_reference: bool = False,
    ) -> None:
        ks = tuple(int(k) for k in ks)
        super().__init__(gallery_ids, top_k=max(ks), exclude_reference=exclude_reference)
        self.ks = ks
        self.prefix = prefix

    def _update(self, batch: dict[str, Any], positions: Tensor) -> None:
        ranking = head(positions, self.top_k)
        self.ranking.append(ranking)
        target = lookup_positions(batch["target_id"], self.position, self.device, missing=-2)
        hits = (ranking == target[:, None]) & (target[:, None] >= 0)
        self.values.append(torch.stack([hits[:, :k].any(dim=1) for k in self.ks], dim=1).float())

    def compute(self) -> dict[str, float]:
        if not len(self.query_index):
            raise ValueError("TargetRecall.compute() called before any update")
        return super().compute()

    def _metrics(self, states: dict[str, Tensor]) -> dict[str, float]:
        values = states["values"]
        recall = 100.0 * values.sum(dim=0) / torch.tensor(float(len(values)), device=values.device)
        return {f"{self.prefix}R@{k}": float(v) for k, v in zip(self.ks, recall)}
