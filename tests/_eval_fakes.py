"""A tiny deterministic stand-in for ``CoAlign`` used by the evaluation tests.

It implements exactly the surface the evaluation code uses (``preprocess``, ``encode_queries``,
``encode_targets``, ``similarity``, ``device``), so the benchmark tests do not depend on a backbone. Image
features are a fixed random projection of the pixels; a query adds a hash-seeded text vector to its
reference's features, so rankings depend on both inputs.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from coalign import QueryFeatures, TargetFeatures
from coalign.heads.base import max_over_embeddings
from coalign.transforms import ImageTransform


class FakeCIRModel(nn.Module):
    """``K`` global vectors of width ``dim`` per target; queries are ``[B, dim]``."""

    def __init__(self, size: int = 8, dim: int = 16, k: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(3 * size * size, k * dim, generator=g))
        self.k, self.dim = k, dim
        self.preprocess = ImageTransform(size)
        self.target_calls = 0

    @property
    def device(self) -> torch.device:
        return self.proj.device

    def _text(self, text: str) -> torch.Tensor:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode_targets(self, images: torch.Tensor) -> TargetFeatures:
        self.target_calls += len(images)
        x = images.flatten(1) @ self.proj
        emb = F.normalize(x.view(len(images), self.k, self.dim), dim=-1)
        return TargetFeatures(emb, emb[:, :1, :].clone())

    def encode_queries(self, images: torch.Tensor, texts: list[str]) -> QueryFeatures:
        base = (images.flatten(1) @ self.proj).view(len(images), self.k, self.dim).mean(1)
        text = torch.stack([self._text(t) for t in texts]).to(base)
        emb = F.normalize(F.normalize(base, dim=-1) + 0.5 * text / text.norm(dim=-1, keepdim=True), dim=-1)
        return QueryFeatures(emb, emb[:, None, :].clone())

    def similarity(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return max_over_embeddings(query, target)
