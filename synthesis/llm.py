"""Chat-LLM generation through transformers, seeded per item and optionally JSON-constrained.

Two details make the prompts stage reproducible and robust:

* **Per-item sampling.** ``generate`` runs greedy decoding over scores that :class:`SeededSampler` has already
  turned into a one-hot choice: each row draws its token with its own ``random.Random(seed)`` (inverse-CDF over
  the top-p mass, on the model's device). A row's sample therefore depends on its item seed and its own logits,
  not on which other items share the batch (up to floating-point noise in batched matmuls, which the runner
  rules out on resume by keeping batches fixed).
* **JSON-constrained decoding** (:class:`JsonConstraint`): the keys, quotes, brackets and braces are forced and
  the model only chooses the tokens inside the strings (never a quote, backslash or control character), closing a
  string once it has ``min_words`` words, and at the latest at ``max_words``. Every answer then parses; its
  content is still validated. It also lets a tiny random LLM produce parseable answers in tests.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

__all__ = ["ChatLLM", "SeededSampler", "JsonConstraint"]


class JsonConstraint:
    """A per-row state machine forcing fixed text pieces around free string fields, then end-of-sequence.

    Args:
        tokenizer: the model's tokenizer.
        texts: the fixed text before, between and after the string fields: ``len(word_limits) + 1`` pieces
            (e.g. ``['{"a": "', '", "b": "', '"}']``); each field is closed by the first token of the next piece.
        word_limits: ``(min_words, max_words)`` per field.
        eos_token_id: token forced after the last piece.
    """

    def __init__(
        self, tokenizer, texts: Sequence[str], word_limits: Sequence[tuple[int, int]], eos_token_id: int
    ) -> None:
        if len(texts) != len(word_limits) + 1:
            raise ValueError(
                f"JsonConstraint needs one piece more than fields, got {len(texts)} and {len(word_limits)}"
            )
        self.tokenizer = tokenizer
        # forced pieces interleave with fields: piece 0, field 0, piece 1, field 1, ..., last piece, then EOS
        self.pieces = [
            tokenizer.encode(t, add_special_tokens=False) + ([eos_token_id] if i == len(word_limits) else [])
            for i, t in enumerate(texts)
        ]
        self.word_limits = list(word_limits)
        self._field_mask: torch.Tensor | None = None
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        # phase 2k: inside forced piece k (self.pos = position in it); phase 2k+1: inside field k
        self.phase = [0] * batch_size
        self.pos = [0] * batch_size
        self.field: list[list[int]] = [[] for _ in range(batch_size)]

    def _mask_for_fields(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        if self._field_mask is None or self._field_mask.device != device or len(self._field_mask) != vocab_size:
            n = min(vocab_size, len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in range(n)])
            special = set(self.tokenizer.all_special_ids)
            ok = [
                i not in special and bool(t) and not any(c in t for c in '"\\{}') and t.isprintable()
                for i, t in enumerate(texts)
            ]
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[:n] = torch.tensor(ok)
            self._field_mask = mask.to(device)
        return self._field_mask

    def advance(self, row: int, token: int) -> None:
        """Update row ``row`` after it emitted ``token``."""
        phase = self.phase[row]
        if phase >= 2 * len(self.word_limits) + 1:
            return  # finished; generate pads this row
        if phase % 2 == 0:
            self.pos[row] += 1
            if self.pos[row] == len(self.pieces[phase // 2]):
                self.phase[row], self.pos[row], self.field[row] = phase + 1, 0, []
        elif token == self.pieces[phase // 2 + 1][0]:  # the field was closed: go through the next piece
            self.phase[row], self.pos[row] = phase + 1, 1
            if len(self.pieces[phase // 2 + 1]) == 1:
                self.phase[row], self.pos[row], self.field[row] = phase + 2, 0, []
        else:
            self.field[row].append(token)

    def allowed(self, row: int, vocab_size: int, device: torch.device) -> torch.Tensor | int | None:
        """A mask, a single forced token, or None (anything: row finished)."""
        phase = self.phase[row]
        if phase >= 2 * len(self.word_limits) + 1:
            return None
        if phase % 2 == 0:
            return self.pieces[phase // 2][self.pos[row]]
        lo, hi = self.word_limits[phase // 2]
        close = self.pieces[phase // 2 + 1][0]
        words = len(self.tokenizer.decode(self.field[row]).split()) if self.field[row] else 0
        if words >= hi:
            return close
        mask = self._mask_for_fields(vocab_size, device).clone()
        mask[close] = words >= lo
        return mask


class SeededSampler(LogitsProcessor):
    """Samples each row from its own seeded stream and returns scores whose argmax is that sample.

    Args:
        seeds: one seed per row.
        temperature: 0 means greedy.
        top_p: nucleus mass.
        constraint: optional :class:`JsonConstraint`, reset for this batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, constraint: JsonConstraint | None):
        self.rngs = [random.Random(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.constraint = constraint
        self._seen = None  # input length at the previous call, to find the token each row just emitted
        if constraint is not None:
            constraint.reset(len(seeds))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, vocab = scores.shape
        scores = scores.float()
        if self.constraint is not None:
            if self._seen is not None:
                for row, token in enumerate(input_ids[:, -1].tolist()):
                    self.constraint.advance(row, token)
            self._seen = input_ids.shape[1]
            for row in range(batch):
                allowed = self.constraint.allowed(row, vocab, scores.device)
                if isinstance(allowed, int):
                    forced = torch.full_like(scores[row], float("-inf"))
                    forced[allowed] = 0.0
                    scores[row] = forced
                elif allowed is not None:
                    scores[row] = scores[row].masked_fill(~allowed, float("-inf"))
        # one uniform number per row, drawn in Python so the stream is identical on every device
        u = torch.tensor([rng.random() for rng in self.rngs], device=scores.device)
        if self.temperature <= 0:
            token = scores.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(scores / self.temperature, dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < self.top_p)  # the top token is always kept
            cum = sorted_p.cumsum(-1)
            pos = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(1)).clamp(max=vocab - 1)
            token = order.gather(1, pos)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class ChatLLM:
    """A transformers chat model answering batches of conversations.

    Args:
        model: a causal LM (already on its device, in eval mode).
        tokenizer: its tokenizer, with a chat template.
        max_new_tokens: answer budget.
        temperature: sampling temperature.
        top_p: nucleus mass.
        constraint: JSON constraint applied to every answer, or None.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        constraint: JsonConstraint | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.constraint = constraint

    @torch.inference_mode()
    def generate(self, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int]) -> list[str]:
        """One answer per conversation, sampled with its seed."""
        texts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        # a fresh config: a hub model's generation_config (sampling defaults, penalties) must not mix with ours
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        sampler = SeededSampler(seeds, self.temperature, self.top_p, self.constraint)
        out = self.model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
