"""Local contextual reasoning (LCR): token-level matching of query and target tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._features import QueryFeatures, TargetFeatures
from ..registry import register_component
from .base import LocalHead, soft_cross_entropy, soft_positive_targets

__all__ = ["TokenReasoningHead"]


@register_component
class TokenReasoningHead(LocalHead):
    """Scores a (query, target) pair by its best token-to-token matches.

    Tokens are first projected (``P``, initialised to the identity when ``projection_dim`` equals the token
    width, so training starts from the backbone's own geometry) and L2-normalised. For query tokens
    ``u_1..u_L`` (padding excluded) and target tokens ``v_1..v_M``::

        a_l      = max_m <P u_l, P v_m>                      (each query token's best match in the target)
        r(q, t)  = mean of the top-k values of {a_l}         (k = min(top_k, number of valid query tokens))

    This is the "mean of the top-k token similarities" of the authors' sister model; the paper's exact form is
    unpublished. The auxiliary loss is the same soft-positive cross-entropy as the global head, on ``r / tau``,
    with the same rule for soft positives (:func:`soft_positive_targets`): the other targets of the query's group,
    never a target that is the query's own reference image (given ``reference_ids``), which stays a negative.
    *Masked-feature reasoning*: while training, each valid query token is hidden with probability
    ``mask_ratio`` before scoring, so a pair must be matched from partial evidence (our reading of the sister
    model's masked-feature loss). At inference the head re-ranks the global top-K (see ``CoAlign.rerank``).

    Args:
        token_dim: width D of the backbone's tokens; None (the usual case) takes it from the backbone when
            ``CoAlign`` binds the head (see :meth:`LocalHead.bind`). Given, it must match the backbone.
        projection_dim: width of the projected tokens (None keeps D, with no projection).
        top_k: how many best-matching query tokens are averaged.
        mask_ratio: probability of hiding a query token during training.
        beta: soft-positive weight for same-group targets.
        init_temperature: initial temperature of the local scores (learned).
    """

    def __init__(
        self,
        token_dim: int | None = None,
        projection_dim: int | None = None,
        top_k: int = 8,
        mask_ratio: float = 0.25,
        beta: float = 0.1,
        init_temperature: float = 0.07,
    ):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.top_k = top_k
        self.mask_ratio = mask_ratio
        self.beta = beta
        self.token_dim = token_dim
        self.projection_dim = projection_dim
        self.projection: nn.Module = nn.Identity()
        if token_dim is not None:
            self._build_projection(token_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def _build_projection(self, token_dim: int) -> None:
        if self.projection_dim is not None:
            self.projection = nn.Linear(token_dim, self.projection_dim, bias=False)
            if self.projection_dim == token_dim:
                nn.init.eye_(self.projection.weight)

    def bind(self, token_dim: int) -> None:
        if self.token_dim is None:
            self.token_dim = token_dim
            self._build_projection(token_dim)
        elif self.token_dim != token_dim:
            raise ValueError(
                f"TokenReasoningHead was given token_dim={self.token_dim} but the backbone's tokens are {token_dim} "
                "wide; leave token_dim out, the head takes it from the backbone"
            )

    def _project(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.projection(tokens), dim=-1)

    def _reduce(self, best: Tensor, mask: Tensor) -> Tensor:
        """Mean of the top-k of ``best [..., L]`` over valid positions ``mask [..., L]``."""
        k = min(self.top_k, best.shape[-1])
        top = best.masked_fill(~mask, float("-inf")).topk(k, dim=-1).values
        valid = torch.isfinite(top)
        count = valid.sum(dim=-1).clamp(min=1)
        return torch.where(valid, top, torch.zeros_like(top)).sum(dim=-1) / count

    def _mask(self, query: QueryFeatures) -> Tensor:
        mask = query.token_mask
        if mask is None:
            mask = torch.ones(query.tokens.shape[:2], dtype=torch.bool, device=query.tokens.device)
        return mask.bool()

    def score_pairs(self, query: QueryFeatures, target_tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        q = self._project(query.tokens)  # [Nq, L, D']
        t = self._project(target_tokens)  # [Nq, K, M, D']
        best = torch.einsum("qld,qkmd->qklm", q, t).amax(dim=-1)  # [Nq, K, L]
        mask = self._mask(query) if mask is None else mask
        return self._reduce(best, mask[:, None, :].expand_as(best))

    def score(self, query: QueryFeatures, target: TargetFeatures, mask: Tensor | None = None) -> Tensor:
        q = self._project(query.tokens)  # [Nq, L, D']
        t = self._project(target.tokens)  # [Nt, M, D']
        best = torch.einsum("ild,jmd->ijlm", q, t).amax(dim=-1)  # [Nq, Nt, L]
        mask = self._mask(query) if mask is None else mask
        return self._reduce(best, mask[:, None, :].expand_as(best))

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
        mask = self._mask(query)
        if self.training and self.mask_ratio > 0:
            keep = torch.rand(mask.shape, device=mask.device) >= self.mask_ratio
            # never hide every token of a query: keep its first valid token
            first = F.one_hot(mask.float().argmax(dim=1), mask.shape[1]).bool()
            mask = mask & (keep | first)
        temperature = self.log_temperature.exp().clamp(0.001, 1.0)
        logits = self.score(query, target, mask) / temperature
        y = soft_positive_targets(groups, logits.shape[0], self.beta, logits.device, target_ids, reference_ids)
        negative_logits = None if negatives is None else self.score(query, negatives, mask) / temperature
        return soft_cross_entropy(logits, y, negative_logits)
