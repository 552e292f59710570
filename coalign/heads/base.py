"""Head contracts: the global contextual alignment head and the local contextual reasoning head."""

from __future__ import annotations

import abc

from torch import Tensor

from .._features import QueryFeatures, TargetFeatures
from .._registry import Component

__all__ = ["GlobalHead", "LocalHead", "max_over_embeddings"]


def max_over_embeddings(query: Tensor, target: Tensor) -> Tensor:
    """Global similarity of every query with every target.

    ``s(q, t) = max_k <q, t_k>`` for ``query [Nq, E]`` and ``target [Nt, K, E]``; returns ``[Nq, Nt]``.
    With K = 1 this is the plain cosine similarity of normalised vectors.
    """
    if target.dim() == 2:
        target = target.unsqueeze(1)
    nt, k, e = target.shape
    scores = query @ target.reshape(nt * k, e).T  # [Nq, Nt*K]
    return scores.view(query.shape[0], nt, k).amax(dim=-1)


class GlobalHead(Component, abc.ABC):
    """Global contextual alignment: the similarity used for retrieval and its training loss."""

    def similarity(self, query: Tensor, target: Tensor) -> Tensor:
        """``[Nq, E] x [Nt, K, E] -> [Nq, Nt]`` retrieval scores (higher is better)."""
        return max_over_embeddings(query, target)

    @abc.abstractmethod
    def forward(self, query: QueryFeatures, target: TargetFeatures, groups: Tensor | None = None) -> Tensor:
        """Scalar training loss for a batch of aligned (query i, target i) pairs.

        Args:
            query: composed query features of the batch.
            target: target features of the batch, row i is the target of query i.
            groups: ``[B]`` int group ids; triplets that share a group are soft positives. None = all distinct.
        """


class LocalHead(Component, abc.ABC):
    """Local contextual reasoning over query and target tokens."""

    @abc.abstractmethod
    def score(self, query: QueryFeatures, target: TargetFeatures) -> Tensor:
        """Pairwise local scores ``[Nq, Nt]`` of every query with every target (used to re-rank a top-K)."""

    @abc.abstractmethod
    def forward(self, query: QueryFeatures, target: TargetFeatures, groups: Tensor | None = None) -> Tensor:
        """Scalar auxiliary training loss for a batch of aligned pairs (same conventions as GlobalHead)."""
