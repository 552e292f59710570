"""The model-based filters of member pairs: the CLIP-score filter and the judge filter.

**CLIP-score filter** (:class:`CLIPScoreFilter`): each image matches its caption, they share their elements, and
the change agrees.

The filter asks a :class:`.backends.ScorerBackend` (default: :class:`.hf_backends.CLIPScorerBackend`). With
``s(image, caption)`` its score, ``r, t`` the reference (source) and target (edit) images and ``cr, ct`` their
captions:

=====================  =======================================  ==============================================
score                  formula                                  kept when
=====================  =======================================  ==============================================
``reference_caption``  ``s(r, cr)``                             ``>= min_caption_score``
``target_caption``     ``s(t, ct)``                             ``>= min_caption_score``
``caption_margin``     ``min(s(r,cr)-s(r,ct),                   ``>= min_caption_margin``: each image matches
                       s(t,ct)-s(t,cr))``                       its own caption better than the other one
``pair_similarity``    ``cos(r, t)`` (embeddings)               in ``[min_pair_similarity, max_pair_similarity]``:
                                                                alike enough to share their elements, yet not
                                                                near-duplicates (the edit must be visible)
``direction``          ``cos(t - r, ct - cr)`` (embeddings)     ``>= min_direction``: the image change points
                                                                the same way as the caption change
=====================  =======================================  ==============================================

The last two need embeddings: they are computed (and checked) only when the scorer provides
``embeddings`` (CLIP does); a scorer without them is judged on the first three.

Default thresholds (``ClipFilterConfig``) follow the ranges InstructPix2Pix used for its CLIP filtering of
Prompt-to-Prompt pairs with ViT-L/14 (caption >= 0.2, image-image >= 0.75, direction >= 0.2), loosened a little
(0.7, 0.1) because the panels of one composite are already consistent; the upper bound 0.97 rejects pairs where
the edit did not happen. They are starting points to tune on the report, not values the paper gives.

**Judge filter** (:class:`JudgeFilter`): is the edit panel the source panel changed as the forward text says?

The filter asks a :class:`.backends.JudgeBackend` (default: :class:`.hf_backends.MLLMJudgeBackend`, a multimodal
LLM reading P(yes) of one yes/no question about the pair shown side by side) for the probability that the target
is the reference changed as the text says. With ``both_directions`` it also asks about the edit -> source change
with the backward text. Scores: ``forward`` (and ``backward``), and ``min_yes``, their minimum, which must reach
``min_yes_probability``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .backends import JudgeBackend, ScorerBackend
from .config import ClipFilterConfig, JudgeConfig
from .hf_backends import judge_backend, scorer_backend
from .pair_filter import PairFilter, PairInput

__all__ = ["CLIPScoreFilter", "JudgeFilter", "clip_scores"]


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


class CLIPScoreFilter(PairFilter):
    """Scores member pairs with a scorer backend; see the module docstring.

    Args:
        config: thresholds and batch size.
        backend: the scorer (default: built from ``config``).
    """

    name = "clip"

    def __init__(self, config: ClipFilterConfig, backend: ScorerBackend | None = None):
        self.config = config
        self.batch_size = config.batch_size
        self.backend = backend if backend is not None else scorer_backend(config)

    def settings(self) -> dict[str, Any]:
        return self.backend.settings()

    def setup(self, device: torch.device) -> None:
        self.backend.setup(device)

    def teardown(self) -> None:
        self.backend.teardown()

    def score(self, pairs: Sequence[PairInput]) -> list[dict[str, Any]]:
        images = [im for pair in pairs for im in pair.images()]
        texts = [c for pair in pairs for c in (pair.pair["reference_caption"], pair.pair["target_caption"])]
        emb = self.backend.embeddings(images, texts)
        if emb is not None:
            image_emb, text_emb = emb
            scores = clip_scores(image_emb[0::2], image_emb[1::2], text_emb[0::2], text_emb[1::2])
            return [{k: round(float(v[n]), 5) for k, v in scores.items()} for n in range(len(pairs))]
        # own caption (r-cr, t-ct) and the other one (r-ct, t-cr), in one call
        swapped = [c for pair in pairs for c in (pair.pair["target_caption"], pair.pair["reference_caption"])]
        s = self.backend.score(images + images, texts + swapped)
        own, other = s[: len(images)], s[len(images) :]
        out = []
        for n in range(len(pairs)):
            r, t, r_other, t_other = own[2 * n], own[2 * n + 1], other[2 * n], other[2 * n + 1]
            out.append(
                {
                    "reference_caption": round(float(r), 5),
                    "target_caption": round(float(t), 5),
                    "caption_margin": round(float(min(r - r_other, t - t_other)), 5),
                }
            )
        return out

    def passes(self, scores: dict[str, Any]) -> bool:
        c = self.config
        ok = (
            min(scores["reference_caption"], scores["target_caption"]) >= c.min_caption_score
            and scores["caption_margin"] >= c.min_caption_margin
        )
        if "pair_similarity" in scores:
            ok = ok and c.min_pair_similarity <= scores["pair_similarity"] <= c.max_pair_similarity
        if "direction" in scores:
            ok = ok and scores["direction"] >= c.min_direction
        return ok


class JudgeFilter(PairFilter):
    """Scores member pairs with a judge backend; see the module docstring.

    Args:
        config: threshold, directions and batch size.
        backend: the judge (default: built from ``config``).
    """

    name = "judge"

    def __init__(self, config: JudgeConfig, backend: JudgeBackend | None = None):
        self.config = config
        self.batch_size = config.batch_size
        self.backend = backend if backend is not None else judge_backend(config)

    def settings(self) -> dict[str, Any]:
        return {**self.backend.settings(), "both_directions": self.config.both_directions}

    def setup(self, device: torch.device) -> None:
        self.backend.setup(device)

    def teardown(self) -> None:
        self.backend.teardown()

    def score(self, pairs: Sequence[PairInput]) -> list[dict[str, Any]]:
        refs = [p.images()[0] for p in pairs]
        tgts = [p.images()[1] for p in pairs]
        forward = self.backend.judge(refs, tgts, [p.pair["forward"] for p in pairs])
        scores = [{"forward": round(float(f), 5)} for f in forward]
        if self.config.both_directions:
            backward = self.backend.judge(tgts, refs, [p.pair["backward"] for p in pairs])
            for s, b in zip(scores, backward, strict=True):
                s["backward"] = round(float(b), 5)
        for s in scores:
            s["min_yes"] = min(s.values())
        return scores

    def passes(self, scores: dict[str, Any]) -> bool:
        return scores["min_yes"] >= self.config.min_yes_probability
