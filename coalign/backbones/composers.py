"""Composers fuse a reference-image feature and a text feature into one composed-query feature.

Two-tower backbones (CLIP, the tiny backbone) encode image and text separately and need a composer; the
BLIP-2 backbone composes inside its Q-Former and needs none. The image-only and text-only composers are the
ablation baselines that show a model really composes.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Component, register_component

__all__ = ["Composer", "Combiner", "ImageOnlyComposer", "TextOnlyComposer", "SumComposer"]


class Composer(Component, abc.ABC):
    """``forward(image [B, E], text [B, E]) -> composed [B, E]`` (not normalised)."""

    @abc.abstractmethod
    def forward(self, image: Tensor, text: Tensor) -> Tensor: ...


@register_component
class Combiner(Composer):
    """CLIP4Cir's Combiner (Baldrati et al., 2022).

    With ``t' = dropout(relu(W_t t))``, ``i' = dropout(relu(W_i i))`` and ``c = [t'; i']``::

        lambda = sigmoid(W_l2 dropout(relu(W_l1 c)))
        out    = W_o dropout(relu(W_c c)) + lambda * t + (1 - lambda) * i

    Args:
        dim: feature width E of the image and text features.
        projection_dim: width of the projected features (CLIP4Cir uses 4 * 640 for RN50x4).
        hidden_dim: width of the combining layer (CLIP4Cir uses 8 * 640).
        dropout: dropout probability (CLIP4Cir uses 0.5).
    """

    def __init__(self, dim: int, projection_dim: int = 2560, hidden_dim: int = 5120, dropout: float = 0.5):
        super().__init__()
        self.text_projection = nn.Linear(dim, projection_dim)
        self.image_projection = nn.Linear(dim, projection_dim)
        self.combiner = nn.Linear(2 * projection_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
            nn.Sigmoid(),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        t = self.dropout(F.relu(self.text_projection(text)))
        i = self.dropout(F.relu(self.image_projection(image)))
        c = torch.cat([t, i], dim=-1)
        lam = self.dynamic_scalar(c)
        return self.output(self.dropout(F.relu(self.combiner(c)))) + lam * text + (1 - lam) * image


@register_component
class SumComposer(Composer):
    """``out = image + text``: the parameter-free zero-shot baseline (as in Pic2Word/CLIP4Cir's sum)."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return image + text


@register_component
class ImageOnlyComposer(Composer):
    """Ablation baseline: ignores the text; the query is the reference image's feature through an MLP."""

    def __init__(self, dim: int, hidden_dim: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return image + self.mlp(image)


@register_component
class TextOnlyComposer(Composer):
    """Ablation baseline: ignores the reference image; the query is the text's feature through an MLP."""

    def __init__(self, dim: int, hidden_dim: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return text + self.mlp(text)
