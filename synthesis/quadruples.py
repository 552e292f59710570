"""Caption quadruples: what the LLM is asked, how its answer is parsed and validated, and near-duplicate removal.

A quadruple is ``{"reference_caption", "target_caption", "forward", "backward"}``: two captions of images that
differ by one edit, and the modification texts that turn the first into the second (``forward``) and back
(``backward``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import PromptsConfig, Taxonomy
from .llm import QUADRUPLE_KEYS

__all__ = ["Draw", "draw", "conversation", "parse_quadruple", "QuadrupleError", "near_duplicates"]

SYSTEM_PROMPT = (
    "You write training data for composed image retrieval: pairs of photographs that differ by exactly one edit. "
    "Answer with a single JSON object and nothing else."
)

USER_PROMPT = """Invent two photographs of {domain} that differ by exactly one edit of this kind: {edit_type} \
({edit_description}). Everything else (subject identity, setting, style, lighting) stays the same.
Return a JSON object with exactly these keys:
"reference_caption": a concrete, visual description of the first photograph ({min_caption}-{max_caption} words);
"target_caption": the description of the second photograph ({min_caption}-{max_caption} words);
"forward": the instruction that turns the first photograph into the second ({min_text}-{max_text} words, \
imperative, without the words "photo" or "image");
"backward": the instruction that turns the second photograph back into the first ({min_text}-{max_text} words).
Vary subjects, settings and wording; variation {variation}."""


@dataclass(frozen=True)
class Draw:
    """The seeded choice of what quadruple ``index`` is about."""

    domain: str
    edit_type: str
    variation: int


def draw(taxonomy: Taxonomy, seed: int, index: int) -> Draw:
    """Domain and edit type for item ``index``, uniform and independent of every other item."""
    rng = random.Random(hashlib.blake2b(f"draw/{seed}/{index}".encode(), digest_size=8).digest())
    return Draw(rng.choice(taxonomy.domains), rng.choice(sorted(taxonomy.edit_types)), rng.randrange(10_000))


def conversation(d: Draw, config: PromptsConfig) -> list[dict[str, str]]:
    """The chat messages asking for one quadruple."""
    user = USER_PROMPT.format(
        domain=d.domain,
        edit_type=d.edit_type,
        edit_description=config.taxonomy.edit_types[d.edit_type],
        min_caption=config.min_caption_words,
        max_caption=config.max_caption_words,
        min_text=config.min_text_words,
        max_text=config.max_text_words,
        variation=d.variation,
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class QuadrupleError(ValueError):
    """An LLM answer that is not a valid quadruple; the message says why (it is kept in the item's record)."""


_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_quadruple(answer: str, config: PromptsConfig) -> dict[str, str]:
    """Extract and validate a quadruple from an LLM answer.

    Accepts the object alone or wrapped in prose or a Markdown code fence; extra keys are dropped.

    Raises:
        QuadrupleError: no JSON object, a missing or non-string field, a length outside the configured word
            limits, or a degenerate pair (identical captions or identical texts both ways).
    """
    text = _FENCE.sub("", answer)
    start = text.find("{")
    if start < 0:
        raise QuadrupleError("no JSON object in the answer")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as err:
        raise QuadrupleError(f"invalid JSON: {err.msg} at char {err.pos}") from None
    if not isinstance(obj, dict):
        raise QuadrupleError("the JSON value is not an object")
    missing = [k for k in QUADRUPLE_KEYS if k not in obj]
    if missing:
        raise QuadrupleError(f"missing keys {missing}")
    quad: dict[str, str] = {}
    for key in QUADRUPLE_KEYS:
        value = obj[key]
        if not isinstance(value, str):
            raise QuadrupleError(f"{key} is a {type(value).__name__}, not a string")
        value = " ".join(value.split())
        caption = key.endswith("caption")
        lo, hi = (
            (config.min_caption_words, config.max_caption_words)
            if caption
            else (config.min_text_words, config.max_text_words)
        )
        if not lo <= len(value.split()) <= hi:
            raise QuadrupleError(f"{key} has {len(value.split())} words, outside [{lo}, {hi}]")
        quad[key] = value
    if _normalise(quad["reference_caption"]) == _normalise(quad["target_caption"]):
        raise QuadrupleError("the two captions are identical")
    if _normalise(quad["forward"]) == _normalise(quad["backward"]):
        raise QuadrupleError("forward and backward texts are identical")
    return quad


# -- near-duplicates ---------------------------------------------------------------------------------------
_NUM_PERM, _BANDS = 64, 16  # 16 bands of 4 rows: pairs above ~0.6 Jaccard almost always become candidates
_MASK61 = (1 << 61) - 1


def _shingles(quad: dict[str, str]) -> set[str]:
    words = _normalise(quad["reference_caption"]).split() + ["|"] + _normalise(quad["target_caption"]).split()
    return {" ".join(words[i : i + 2]) for i in range(len(words) - 1)} or set(words)


def _minhash(shingles: set[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") & _MASK61 for s in shingles],
        dtype=np.uint64,
    )
    # multiply-add modulo 2**64 (numpy wraps): a universal hash family, good enough for MinHash
    return (hashes[None, :] * a[:, None] + b[:, None]).min(axis=1)


def near_duplicates(quads: Sequence[dict[str, Any]], threshold: float) -> dict[int, int]:
    """Map position -> earlier position it nearly duplicates (Jaccard of word bigrams over both captions).

    MinHash with LSH banding proposes candidate pairs in roughly linear time; each candidate is then checked
    with the exact Jaccard similarity, so no pair below ``threshold`` is ever dropped. The earliest quadruple of
    a cluster is kept, which makes the result independent of how the work was sharded.
    """
    rng = np.random.default_rng(20250707)
    a = rng.integers(1, 2**63, _NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, _NUM_PERM, dtype=np.uint64)
    shingles = [_shingles(q) for q in quads]
    rows = _NUM_PERM // _BANDS
    kept: dict[tuple, list[int]] = defaultdict(list)  # LSH buckets of the quadruples kept so far
    duplicate_of: dict[int, int] = {}
    for pos, sh in enumerate(shingles):
        signature = _minhash(sh, a, b)
        keys = [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(_BANDS)]
        candidates = sorted({c for key in keys for c in kept.get(key, ())})
        for earlier in candidates:
            if len(sh & shingles[earlier]) / len(sh | shingles[earlier]) >= threshold:
                duplicate_of[pos] = earlier
                break
        else:
            for key in keys:
                kept[key].append(pos)
    return duplicate_of
