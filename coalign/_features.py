"""The two feature containers that flow from a backbone into the heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QueryFeatures", "TargetFeatures"]


@dataclass
class QueryFeatures:
    """Features of a composed query (reference image + modification text).

    Attributes:
        embedding: ``[B, E]`` L2-normalised global embedding of the composed query.
        tokens: ``[B, L, D]`` local query tokens, for the local contextual reasoning head (L fixed per backbone).
        token_mask: ``[B, L]`` bool, True where a token is real (not padding); None means all real.
    """

    embedding: Tensor
    tokens: Tensor
    token_mask: Tensor | None = None

    def __len__(self) -> int:
        return self.embedding.shape[0]

    def to(self, device=None, dtype=None) -> QueryFeatures:
        mask = None if self.token_mask is None else self.token_mask.to(device)
        return QueryFeatures(self.embedding.to(device, dtype), self.tokens.to(device, dtype), mask)

    def __getitem__(self, index) -> QueryFeatures:
        mask = None if self.token_mask is None else self.token_mask[index]
        return QueryFeatures(self.embedding[index], self.tokens[index], mask)


@dataclass
class TargetFeatures:
    """Features of a target (gallery) image.

    Attributes:
        embedding: ``[B, K, E]`` L2-normalised global embeddings, ``K >= 1``. A query scores a target by the
            maximum over the K vectors (BLIP-2 keeps its 32 Q-Former query outputs, K = 32; CLIP has K = 1).
        tokens: ``[B, L, D]`` local target tokens for the local contextual reasoning head.
    """

    embedding: Tensor
    tokens: Tensor

    def __len__(self) -> int:
        return self.embedding.shape[0]

    def to(self, device=None, dtype=None) -> TargetFeatures:
        return TargetFeatures(self.embedding.to(device, dtype), self.tokens.to(device, dtype))

    def __getitem__(self, index) -> TargetFeatures:
        return TargetFeatures(self.embedding[index], self.tokens[index])

    @staticmethod
    def cat(parts: list[TargetFeatures]) -> TargetFeatures:
        return TargetFeatures(torch.cat([p.embedding for p in parts]), torch.cat([p.tokens for p in parts]))
