"""Global contextual alignment (GCA): contrastive alignment with same-group soft positives."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._features import QueryFeatures, TargetFeatures
from ..registry import register_component
from .base import GlobalHead, soft_cross_entropy, soft_positive_targets

__all__ = ["ContextualAlignmentHead"]


@register_component
class ContextualAlignmentHead(GlobalHead):
    """Global contextual alignment of composed queries and targets inside a batch-wide context.

    For a batch of B aligned pairs, with ``s_ij = max_k <q_i, t_jk>`` (cosine similarities of normalised
    embeddings; ``K = 1`` for single-vector targets) and a learnable temperature ``tau``::

        L = -1/B sum_i sum_j Y_ij log softmax_j(s_ij / tau)

    where ``Y`` (:func:`soft_positive_targets`) keeps ``1 - beta`` on the true target and spreads ``beta`` over the
    targets of the *other triplets of the same group* (the paper's "broader context": a batch deliberately holds
    several triplets of one source, whose targets are related, so strict one-hot InfoNCE would push them away as
    hard negatives). ``beta = 0`` is plain InfoNCE. With ``symmetric=True`` the target-to-query direction is added
    and the two are averaged.

    **Soft positives are the other targets of the group, never the query's own reference image.** With
    ``target_ids`` a target showing the same image as query i's target counts as a positive (weight shared with
    it); with ``reference_ids`` (``CoAlign`` passes both, from the batch's image ids) a target that *is* query i's
    reference image gets weight 0 as a soft positive of query i and stays an ordinary negative: in a group of
    ``source -> edit`` and ``edit -> source`` triplets the source image is the target of the backward triplets,
    and rewarding it would teach the "return the reference" shortcut.

    The paper does not publish ``beta`` or ``tau``; our defaults are ``beta = 0.1`` (a label-smoothing-sized
    weight) and ``tau`` initialised to 0.07 as in CLIP/BLIP-2 and learned in log space, clamped to [0.001, 1].

    Args:
        beta: total weight given to same-group soft positives, in [0, 1) (see :func:`soft_positive_targets`).
        init_temperature: initial ``tau``.
        learn_temperature: learn ``tau`` (else keep it fixed).
        symmetric: also align targets to queries.
    """

    def __init__(
        self, beta: float = 0.1, init_temperature: float = 0.07, learn_temperature: bool = True, symmetric: bool = False
    ):
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        self.beta = beta
        self.symmetric = symmetric
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)), requires_grad=learn_temperature)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp(0.001, 1.0)

    def logits(self, query: QueryFeatures, target: TargetFeatures) -> Tensor:
        """``[B, B]`` scaled similarities ``s_ij / tau`` of the batch's queries and targets."""
        return self.similarity(query.embedding, target.embedding) / self.temperature

    def forward(
        self,
        query: QueryFeatures,
        target: TargetFeatures,
        groups: Tensor | None = None,
        target_ids: Tensor | None = None,
        negatives: TargetFeatures | None = None,
        reference_ids: Tensor | None = None,
    ) -> Tensor:
        if len(query) != len(target):
            raise ValueError(f"got {len(query)} queries but {len(target)} targets")
        logits = self.logits(query, target)
        y = soft_positive_targets(groups, logits.shape[0], self.beta, logits.device, target_ids, reference_ids)
        # extra hard-negative columns: a negative for every query
        negative_logits = None if negatives is None else self.logits(query, negatives)
        loss = soft_cross_entropy(logits, y, negative_logits)
        if self.symmetric:
            loss = 0.5 * (loss + soft_cross_entropy(logits.T, y.T))
        return loss
