"""CLIP-score filter: each half matches its caption, the halves share their elements, and the change agrees.

With L2-normalised CLIP embeddings ``r, t`` (reference / target image) and ``cr, ct`` (their captions):

=====================  =======================================  ==============================================
score                  formula                                  kept when
=====================  =======================================  ==============================================
``reference_caption``  ``cos(r, cr)``                           ``>= min_caption_score``
``target_caption``     ``cos(t, ct)``                           ``>= min_caption_score``
``caption_margin``     ``min(cos(r,cr)-cos(r,ct),               ``>= min_caption_margin``: each half matches
                       cos(t,ct)-cos(t,cr))``                   its own caption better than the other one
``pair_similarity``    ``cos(r, t)``                            in ``[min_pair_similarity, max_pair_similarity]``:
                                                                alike enough to share their elements, yet not
                                                                near-duplicates (the edit must be visible)
``direction``          ``cos(t - r, ct - cr)``                  ``>= min_direction``: the image change points
                                                                the same way as the caption change
=====================  =======================================  ==============================================

Default thresholds (``ClipFilterConfig``) follow the ranges InstructPix2Pix used for its CLIP filtering of
Prompt-to-Prompt pairs with ViT-L/14 (caption >= 0.2, image-image >= 0.75, direction >= 0.2), loosened a little
(0.7, 0.1) because a diptych's halves are already consistent; the upper bound 0.97 rejects pairs where the edit
did not happen. They are starting points to tune on the report, not values the paper gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import models
from .config import ClipFilterConfig
from .pair_filter import PairFilter, PairInput

__all__ = ["CLIPScoreFilter", "clip_scores"]


def clip_scores(
    ref: torch.Tensor, tgt: torch.Tensor, ref_text: torch.Tensor, tgt_text: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The scores of the table above for a batch of embeddings ``[B, D]`` (normalised here)."""
    r, t, cr, ct = (F.normalize(x.float(), dim=-1) for x in (ref, tgt, ref_text, tgt_text))

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(-1)

    return {
        "reference_caption": cos(r, cr),
        "target_caption": cos(t, ct),
        "caption_margin": torch.minimum(cos(r, cr) - cos(r, ct), cos(t, ct) - cos(t, cr)),
        "pair_similarity": cos(r, t),
        # F.normalize leaves a zero difference at zero (cos 0): identical images get no direction credit
        "direction": cos(F.normalize(t - r, dim=-1), F.normalize(ct - cr, dim=-1)),
    }


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; older versions a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScoreFilter(PairFilter):
    """Scores with a transformers ``CLIPModel``; see the module docstring."""

    name = "clip"

    def __init__(self, config: ClipFilterConfig):
        self.config = config
        self.batch_size = config.batch_size
        self.model = self.processor = None

    def settings(self) -> dict[str, Any]:
        return {"model": self.config.model.describe(), "revision": self.config.model.revision}

    def setup(self, device: torch.device) -> None:
        self.model, self.processor = models.load_clip(self.config.model, device)

    def teardown(self) -> None:
        self.model = self.processor = None
        models.free_memory()

    @torch.inference_mode()
    def embed(self, images: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings (unnormalised) for a batch."""
        device = self.model.device
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(device, self.model.dtype)
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(device) for k, v in tokens.items()}
        return _features(self.model.get_image_features(pixel_values=pixels)), _features(
            self.model.get_text_features(**tokens)
        )

    def score(self, pairs: Sequence[PairInput]) -> list[dict[str, Any]]:
        images = [im for pair in pairs for im in pair.images()]
        texts = [c for pair in pairs for c in (pair.quad["reference_caption"], pair.quad["target_caption"])]
        image_emb, text_emb = self.embed(images, texts)
        scores = clip_scores(image_emb[0::2], image_emb[1::2], text_emb[0::2], text_emb[1::2])
        return [{k: round(float(v[n]), 5) for k, v in scores.items()} for n in range(len(pairs))]

    def passes(self, scores: dict[str, Any]) -> bool:
        c = self.config
        return (
            min(scores["reference_caption"], scores["target_caption"]) >= c.min_caption_score
            and scores["caption_margin"] >= c.min_caption_margin
            and c.min_pair_similarity <= scores["pair_similarity"] <= c.max_pair_similarity
            and scores["direction"] >= c.min_direction
        )
