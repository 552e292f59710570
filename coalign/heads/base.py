"""Head contracts: the global contextual alignment head and the local contextual reasoning head."""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor

from .._features import QueryFeatures, TargetFeatures
from ..registry import Component

__all__ = ["GlobalHead", "LocalHead", "max_over_embeddings", "soft_positive_targets", "soft_cross_entropy"]


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


def soft_positive_targets(
    groups: Tensor | None,
    batch_size: int,
    beta: float,
    device=None,
    target_ids: Tensor | None = None,
    reference_ids: Tensor | None = None,
) -> Tensor:
    """Row-stochastic target distribution ``Y [B, B]`` with same-group soft positives.

    Let ``S_i = {j : target_j is the same image as target_i}`` (just ``{i}`` without ``target_ids``) and
    ``P_i = {j not in S_i : g_j = g_i and target_j is not the image of query i's reference}`` the other targets of
    i's group. Then::

        Y_ij = (1 - beta) / |S_i|  for j in S_i,     Y_ij = beta / |P_i|  for j in P_i,     0 elsewhere;

    a row without peers puts all its mass on ``S_i``, so ``beta = 0`` or all-distinct groups give InfoNCE (with
    a duplicated target image counted as a positive, never as a negative of itself).

    **Never the query's own reference.** In a group of bidirectional triplets (``source -> edit`` and
    ``edit -> source``) a query's reference image is the target of another triplet of its group; rewarding it as
    a soft positive would teach "return the reference". With ``reference_ids`` such a target gets ``Y_ij = 0`` (it
    stays an ordinary negative). Example, ``beta = 0.2``, one group of ``S->E1, E1->S, S->E2, E2->S``::

        Y = [[0.8, 0,   0.2, 0  ],      S->E1: E2 is the only other target that is not S
             [0,   0.4, 0.2, 0.4],      E1->S: the two S targets share 0.8; E2 is soft; E1 (its reference) is not
             [0.2, 0,   0.8, 0  ],
             [0.2, 0.4, 0,   0.4]]

    Args:
        groups: ``[B]`` group ids, or None (all distinct).
        batch_size: B.
        beta: total soft-positive weight of a row that has peers, in [0, 1).
        device: device of the result.
        target_ids: ``[B]`` integer codes of the target images; equal codes are the same image.
        reference_ids: ``[B]`` codes of the queries' reference images *in the code space of* ``target_ids``
            (a reference that is no target of the batch gets a code no target has, e.g. -1).

    Raises:
        ValueError: an id tensor does not hold B values, or ``reference_ids`` is given without ``target_ids``.
    """
    if reference_ids is not None:
        if target_ids is None:
            raise ValueError("reference_ids are codes in the space of target_ids: pass target_ids too")
        reference_ids = _codes(reference_ids, batch_size, "reference", device)
    eye = torch.eye(batch_size, device=device)
    same_target = eye
    if target_ids is not None:
        target_ids = _codes(target_ids, batch_size, "target", device)
        same_target = (target_ids[:, None] == target_ids[None, :]).float()
    positives = same_target / same_target.sum(dim=1, keepdim=True)
    if groups is None or beta == 0:
        return positives
    groups = _codes(groups, batch_size, "group", device)
    peers = (groups[:, None] == groups[None, :]).float() * (1 - same_target)
    if reference_ids is not None and target_ids is not None:
        peers = peers * (reference_ids[:, None] != target_ids[None, :]).float()
    count = peers.sum(dim=1, keepdim=True)
    has_peers = count > 0
    soft = torch.where(has_peers, beta * peers / count.clamp(min=1), torch.zeros_like(peers))
    return soft + positives * torch.where(has_peers, 1.0 - beta, 1.0)


def _codes(ids: Tensor, batch_size: int, what: str, device) -> Tensor:
    ids = ids.to(device).view(-1)
    if ids.numel() != batch_size:
        raise ValueError(f"got {ids.numel()} {what} ids for a batch of {batch_size}")
    return ids


def soft_cross_entropy(logits: Tensor, targets: Tensor, negative_logits: Tensor | None = None) -> Tensor:
    """``-1/B sum_i sum_j Y_ij log softmax_j(logits_ij)`` for soft targets ``Y [B, B]``.

    ``negative_logits [B, M]`` (scores against extra hard-negative images) are appended as columns with ``Y = 0``.
    """
    if negative_logits is not None:
        logits = torch.cat([logits, negative_logits], dim=1)
        targets = F.pad(targets, (0, negative_logits.shape[1]))
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class GlobalHead(Component, abc.ABC):
    """Global contextual alignment: the similarity used for retrieval and its training loss."""

    def similarity(self, query: Tensor, target: Tensor) -> Tensor:
        """``[Nq, E] x [Nt, K, E] -> [Nq, Nt]`` retrieval scores (higher is better)."""
        return max_over_embeddings(query, target)

    @abc.abstractmethod
    def forward(
        self,
        query: QueryFeatures,
        target: TargetFeatures,
        groups: Tensor | None = None,
        target_ids: Tensor | None = None,
        negatives: TargetFeatures | None = None,
        reference_ids: Tensor | None = None,
    ) -> Tensor:
        """Scalar training loss for a batch of aligned (query i, target i) pairs.

        Args:
            query: composed query features of the batch.
            target: target features of the batch, row i is the target of query i.
            groups: ``[B]`` int group ids; triplets that share a group are soft positives. None = all distinct.
            target_ids: ``[B]`` int codes of the target images; equal codes are the same image (a positive).
            negatives: features of extra hard-negative images (a negative for every query), or None.
            reference_ids: ``[B]`` codes of the queries' reference images in the code space of ``target_ids``; a
                target that is query i's own reference image is never a soft positive of query i (see
                :func:`soft_positive_targets`). None = no such exclusion.
        """


class LocalHead(Component, abc.ABC):
    """Local contextual reasoning over query and target tokens.

    The head never needs the token width written into its config: ``CoAlign`` calls :meth:`bind` with its
    backbone's ``token_dim`` once, right after building both, and a head creates its width-dependent layers there.
    """

    def bind(self, token_dim: int) -> None:
        """Learn the backbone's token width D (called once by ``CoAlign``); create layers that depend on it."""

    def score(self, query: QueryFeatures, target: TargetFeatures) -> Tensor:
        """Local scores ``[Nq, Nt]`` of every query with every target."""
        tokens = target.tokens.unsqueeze(0).expand(len(query), *target.tokens.shape)
        return self.score_pairs(query, tokens)

    @abc.abstractmethod
    def score_pairs(self, query: QueryFeatures, target_tokens: Tensor) -> Tensor:
        """Local scores ``[Nq, K]`` of query i with each of its own K candidates ``target_tokens [Nq, K, Lt, D]``
        (used to re-rank a global top-K)."""

    @abc.abstractmethod
    def forward(
        self,
        query: QueryFeatures,
        target: TargetFeatures,
        groups: Tensor | None = None,
        target_ids: Tensor | None = None,
        negatives: TargetFeatures | None = None,
        reference_ids: Tensor | None = None,
    ) -> Tensor:
        """Scalar auxiliary training loss for a batch of aligned pairs (same conventions as GlobalHead)."""
