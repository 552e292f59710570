"""Multimodal-LLM judge: a transformers image-text-to-text model answers a yes/no rubric about each pair.

The pair is shown as one side-by-side image (reference left, target right, an 8% white gap between them),
which every image-text-to-text model accepts, including single-image ones. Each rubric question
(``JudgeConfig.questions``, filled with the quadruple's captions and texts, followed by "Answer yes or no.") is
asked in its own conversation. Rather than generating and parsing free text, the judge reads the logits of the
first answer token: the question's score is ``P(yes) / (P(yes) + P(no))``, summing over the tokens of
"Yes"/"yes"/" Yes"/" yes" and likewise for no. One forward pass per question, a calibrated score in [0, 1]
that a threshold can be tuned on, and no parsing failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from . import models
from .config import JudgeConfig
from .pair_filter import PairFilter, PairInput

__all__ = ["MLLMJudgeFilter", "side_by_side"]

_SUFFIX = " Answer yes or no."


def side_by_side(left: Image.Image, right: Image.Image, gap: float = 0.08) -> Image.Image:
    """Both images at the height of the taller one, with a white gap of ``gap`` times that height."""
    height = max(left.height, right.height)
    left = left.resize((round(left.width * height / left.height), height))
    right = right.resize((round(right.width * height / right.height), height))
    space = round(gap * height)
    canvas = Image.new("RGB", (left.width + space + right.width, height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + space, 0))
    return canvas


def _first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = set()
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded and encoded[0] != tokenizer.unk_token_id:
            ids.add(encoded[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer cannot spell any of {list(words)}")
    return sorted(ids)


class MLLMJudgeFilter(PairFilter):
    """Scores each rubric question by P(yes); a pair passes when every question reaches the threshold."""

    name = "judge"

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.batch_size = max(1, config.batch_size // len(config.questions))  # batch_size counts questions
        self.model = self.processor = None

    def settings(self) -> dict[str, Any]:
        spec = self.config.model
        return {"model": spec.describe(), "revision": spec.revision, "questions": list(self.config.questions)}

    def setup(self, device: torch.device) -> None:
        self.model, self.processor = models.load_judge(self.config.model, device)
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # the answer's first token is then read at position -1 for every row
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.yes_ids = _first_token_ids(tok, ["Yes", "yes", " Yes", " yes"])
        self.no_ids = _first_token_ids(tok, ["No", "no", " No", " no"])

    def teardown(self) -> None:
        self.model = self.processor = None
        models.free_memory()

    def prompts(self, quad: dict[str, Any]) -> list[str]:
        """The rubric questions filled in for one quadruple, as chat-formatted text."""
        fields = {k: quad[k] for k in ("reference_caption", "target_caption", "forward", "backward")}
        texts = []
        for question in self.config.questions:
            content = [{"type": "image"}, {"type": "text", "text": question.format(**fields) + _SUFFIX}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return texts

    @torch.inference_mode()
    def yes_probability(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) of the next token, one per (image, prompt)."""
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {
            k: (v.to(self.model.device, self.model.dtype) if v.is_floating_point() else v.to(self.model.device))
            for k, v in inputs.items()
        }
        logits = self.model(**inputs).logits[:, -1].float()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).cpu()

    def score(self, pairs: Sequence[PairInput]) -> list[dict[str, Any]]:
        images, texts = [], []
        for pair in pairs:
            pair_image = side_by_side(*pair.images())
            for text in self.prompts(pair.quad):
                images.append(pair_image)
                texts.append(text)
        p = self.yes_probability(images, texts).view(len(pairs), len(self.config.questions))
        return [{"yes": [round(float(v), 5) for v in row], "min_yes": round(float(row.min()), 5)} for row in p]

    def passes(self, scores: dict[str, Any]) -> bool:
        return scores["min_yes"] >= self.config.min_yes_probability
