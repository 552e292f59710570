"""Groups: what the chat model is asked, how its answer is parsed and validated, and near-duplicate removal.

A group is one source scene and ``num_edits`` edited versions of it, with the modification texts between them;
its JSON schema is documented in :mod:`.backends`. After validation a group is
``{"source": str, "edits": [{"caption", "forward", "backward"}, ...], "cross": [{"from", "to", "text"}, ...]}``
(``cross`` may be empty; its indices are 0-based positions in ``edits``).

Validation is strict, and every rejection raises :class:`GroupError` with a message that names the field (the
message is kept in the item's record and counted in ``prompts/report.json``): no JSON object, duplicate keys,
missing or non-string fields, a wrong number of edits, a caption or text outside its word limits or empty, two
captions of the group that are the same (after lower-casing and dropping punctuation), an edit whose forward and
backward texts are the same, a cross entry with bad or repeated indices. Control characters are removed (replaced
by spaces) and whitespace is collapsed before any check; unknown keys are ignored.

Near-duplicate groups (:func:`near_duplicates`) are found with MinHash-LSH over word bigrams of all their captions.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import PromptsConfig, Taxonomy

__all__ = [
    "Draw",
    "draw",
    "conversation",
    "parse_group",
    "GroupError",
    "group_pieces",
    "group_captions",
    "near_duplicates",
]

SYSTEM_PROMPT = (
    "You write training data for composed image retrieval: sets of photographs of one scene, each differing from "
    "the source photograph by one edit. Answer with a single JSON object and nothing else."
)

USER_PROMPT = """Invent {n_panels} photographs of {domain}: a source photograph and {num_edits} variations of it. \
Each variation differs from the source by exactly one edit of this kind: {edit_type} ({edit_description}), and \
the variations differ from each other. Everything else (subject identity, setting, style, lighting) stays the same.
Return a JSON object with these keys:
"source": a concrete, visual description of the source photograph ({min_caption}-{max_caption} words);
"edits": a list of exactly {num_edits} objects, each with "caption" (the description of the variation, \
{min_caption}-{max_caption} words), "forward" (the instruction that turns the source into the variation, \
{min_text}-{max_text} words, imperative, without the words "photo" or "image") and "backward" (the instruction \
that turns the variation back into the source, {min_text}-{max_text} words).{cross}
Vary subjects, settings and wording; variation {variation}."""

CROSS_PROMPT = """
"cross": a list of objects {{"from": i, "to": j, "text": ...}}: the instruction that turns variation i into \
variation j (0-based positions in "edits", {min_text}-{max_text} words), for consecutive variations \
(0 -> 1, 1 -> 2, ...)."""


@dataclass(frozen=True)
class Draw:
    """The seeded choice of what group ``index`` is about."""

    domain: str
    edit_type: str
    variation: int


def draw(taxonomy: Taxonomy, seed: int, index: int) -> Draw:
    """Domain and edit type for item ``index``, uniform and independent of every other item."""
    rng = random.Random(hashlib.blake2b(f"draw/{seed}/{index}".encode(), digest_size=8).digest())
    return Draw(rng.choice(taxonomy.domains), rng.choice(sorted(taxonomy.edit_types)), rng.randrange(10_000))


def conversation(d: Draw, config: PromptsConfig) -> list[dict[str, str]]:
    """The chat messages asking for one group of ``config.group_size`` panels."""
    words = {
        "min_caption": config.min_caption_words,
        "max_caption": config.max_caption_words,
        "min_text": config.min_text_words,
        "max_text": config.max_text_words,
    }
    num_edits = config.group_size - 1
    user = USER_PROMPT.format(
        n_panels=config.group_size,
        num_edits=num_edits,
        domain=d.domain,
        edit_type=d.edit_type,
        edit_description=config.taxonomy.edit_types[d.edit_type],
        variation=d.variation,
        cross=CROSS_PROMPT.format(**words) if config.cross and num_edits > 1 else "",
        **words,
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def group_pieces(num_edits: int, cross: bool) -> tuple[list[str], list[str]]:
    """The fixed JSON text around the string fields of a group, and each field's kind (``caption``/``text``).

    What constrained decoding forces: ``num_edits`` edits and, with ``cross``, the texts edit ``i`` -> ``i + 1``.
    """
    pieces, kinds = ['{"source": "'], ["caption"]
    for k in range(num_edits):
        pieces += [
            '", "edits": [{"caption": "' if k == 0 else '"}, {"caption": "',
            '", "forward": "',
            '", "backward": "',
        ]
        kinds += ["caption", "text", "text"]
    pairs = [(i, i + 1) for i in range(num_edits - 1)] if cross else []
    for n, (i, j) in enumerate(pairs):
        pieces.append(('"}], "cross": [' if n == 0 else '"}, ') + f'{{"from": {i}, "to": {j}, "text": "')
        kinds.append("text")
    pieces.append('"}]}' if pairs else '"}], "cross": []}')
    return pieces, kinds


class GroupError(ValueError):
    """An answer that is not a valid group; the message says why (it is kept in the item's record)."""


_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if dupes := sorted({k for k in keys if keys.count(k) > 1}):
        raise GroupError(f"duplicate keys {dupes}")
    return dict(pairs)


def _clean(value: Any, where: str, limits: tuple[int, int]) -> str:
    if not isinstance(value, str):
        raise GroupError(f"{where} is a {type(value).__name__}, not a string")
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in value)
    text = " ".join(text.split())
    lo, hi = limits
    if not text:
        raise GroupError(f"{where} is empty")
    if not lo <= len(text.split()) <= hi:
        raise GroupError(f"{where} has {len(text.split())} words, outside [{lo}, {hi}]")
    return text


def _object(value: Any, where: str, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GroupError(f"{where} is a {type(value).__name__}, not an object")
    if missing := [k for k in keys if k not in value]:
        raise GroupError(f"{where} misses keys {missing}")
    return value


def parse_group(answer: str, config: PromptsConfig) -> dict[str, Any]:
    """Extract and validate a group of ``config.group_size`` panels from a chat answer.

    Accepts the object alone or wrapped in prose or a Markdown code fence. See the module docstring for the
    checks.

    Raises:
        GroupError: the answer is not a valid group; the message names the field.
    """
    text = _FENCE.sub("", answer)
    start = text.find("{")
    if start < 0:
        raise GroupError("no JSON object in the answer")
    try:
        obj, _ = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys).raw_decode(text[start:])
    except json.JSONDecodeError as err:
        raise GroupError(f"invalid JSON: {err.msg} at char {err.pos}") from None
    obj = _object(obj, "the answer", ("source", "edits"))
    caption = (config.min_caption_words, config.max_caption_words)
    words = (config.min_text_words, config.max_text_words)
    num_edits = config.group_size - 1
    if not isinstance(obj["edits"], list) or len(obj["edits"]) != num_edits:
        got = len(obj["edits"]) if isinstance(obj["edits"], list) else type(obj["edits"]).__name__
        raise GroupError(f"edits must be a list of {num_edits} objects, got {got}")
    group: dict[str, Any] = {"source": _clean(obj["source"], "source", caption), "edits": [], "cross": []}
    for k, raw in enumerate(obj["edits"]):
        edit = _object(raw, f"edits[{k}]", ("caption", "forward", "backward"))
        clean = {
            "caption": _clean(edit["caption"], f"edits[{k}].caption", caption),
            "forward": _clean(edit["forward"], f"edits[{k}].forward", words),
            "backward": _clean(edit["backward"], f"edits[{k}].backward", words),
        }
        if _normalise(clean["forward"]) == _normalise(clean["backward"]):
            raise GroupError(f"edits[{k}].forward and backward texts are identical")
        group["edits"].append(clean)
    captions = [_normalise(c) for c in group_captions(group)]
    if len(set(captions)) != len(captions):
        raise GroupError("two captions of the group are identical")
    cross = obj.get("cross", [])
    if not isinstance(cross, list):
        raise GroupError(f"cross is a {type(cross).__name__}, not a list")
    seen = set()
    for n, raw in enumerate(cross):
        entry = _object(raw, f"cross[{n}]", ("from", "to", "text"))
        i, j = entry["from"], entry["to"]
        if not all(type(x) is int and 0 <= x < num_edits for x in (i, j)) or i == j:
            raise GroupError(f"cross[{n}] needs two different edit positions in [0, {num_edits}), got {i!r}, {j!r}")
        if (i, j) in seen:
            raise GroupError(f"cross[{n}] repeats {i} -> {j}")
        seen.add((i, j))
        group["cross"].append({"from": i, "to": j, "text": _clean(entry["text"], f"cross[{n}].text", words)})
    return group


def group_captions(group: dict[str, Any]) -> list[str]:
    """The panel captions of a group: the source, then each edit."""
    return [group["source"]] + [e["caption"] for e in group["edits"]]


# -- near-duplicates: MinHash-LSH over word bigrams of a group's captions, confirmed with exact Jaccard -------
_NUM_PERM, _BANDS = 64, 16  # 16 bands of 4 rows: pairs above ~0.6 Jaccard almost always become candidates
_MASK61 = (1 << 61) - 1


def _shingles(group: dict[str, Any]) -> set[str]:
    words = " | ".join(_normalise(c) for c in group_captions(group)).split()
    return {" ".join(words[i : i + 2]) for i in range(len(words) - 1)} or set(words)


def _minhash(shingles: set[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") & _MASK61 for s in shingles],
        dtype=np.uint64,
    )
    # multiply-add modulo 2**64 (numpy wraps): a universal hash family, good enough for MinHash
    return (hashes[None, :] * a[:, None] + b[:, None]).min(axis=1)


def near_duplicates(groups: Sequence[dict[str, Any]], threshold: float) -> dict[int, int]:
    """Map position -> earlier position it nearly duplicates (Jaccard of word bigrams over all captions).

    MinHash with LSH banding proposes candidate pairs in roughly linear time; each candidate is then checked
    with the exact Jaccard similarity, so no pair below ``threshold`` is ever dropped. The earliest group of
    a cluster is kept, which makes the result independent of how the work was sharded.
    """
    rng = np.random.default_rng(20250707)
    a = rng.integers(1, 2**63, _NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, _NUM_PERM, dtype=np.uint64)
    shingles = [_shingles(g) for g in groups]
    rows = _NUM_PERM // _BANDS
    kept: dict[tuple, list[int]] = defaultdict(list)  # LSH buckets of the groups kept so far
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
