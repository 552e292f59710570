"""A procedural stand-in for the LLM stage: a grammar that writes Shapes groups in its own words.

Real LLMs cannot run on a CPU-only test machine, yet the paper's claim (a model trained only on synthesized data
retrieves zero-shot on a benchmark it never saw) must still be measurable. This module is the language half of
a procedural world that mirrors the Shapes benchmark (:mod:`coalign.datamodules.shapes`): the same objects
(shapes, colours, sizes, cells of a 3 x 3 grid) and the same five edits, but **its own phrasings**: other sentence
templates, other word order, position synonyms ("lower right corner" for "bottom right"), so that no benchmark
sentence ever appears in the synthesized data (``tests/test_synthesis_shapes_world.py`` checks it exhaustively).

Everything is a pure function of its arguments; :class:`ShapesChat` (registered backend) wraps them. Its twin,
:mod:`.shapes_render`, draws and reads the scenes back from pixels (render, scorer and judge backends).

**Grammar** (parsed back by :func:`parse_caption` and :func:`parse_text`):

- caption: ``<opening> <count> shape(s): <object>, <object> and <object>.``, objects in random order, each
  ``a <size> <colour> <shape> <in|at> the <position>`` or ``a <colour> <shape> of <size> size <in|at> the <position>``;
- modification text: one of several templates per edit type; an existing object is named ``the <colour> <shape>``,
  ``the <shape> that is <colour>`` or ``the <colour> <shape> in the <position>``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from coalign.datamodules.shapes import COLORS, EDITS, POSITIONS, SHAPES, SIZES, Scene

from .backends import ChatBackend, register_backend

__all__ = [
    "POSITION_PHRASES",
    "Change",
    "ShapesChat",
    "describe_change",
    "diff_scenes",
    "parse_caption",
    "parse_text",
    "sample_edit",
    "sample_group",
    "write_caption",
]

Obj = tuple[str, str, str, int]  # (shape, colour, size, cell), as in the benchmark

# several phrasings per cell (index = cell of the 3 x 3 grid); none contains ", " or " and " (caption separators).
# The attribute vocabulary is the benchmark's (its bare position words included: a tiny model that learns its
# words from scratch cannot guess that "center" means "centre"), the sentences around it never are.
POSITION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("top left", "upper left", "top-left corner", "upper left corner"),
    ("top middle", "upper middle", "top centre", "middle of the top row", "top"),
    ("top right", "upper right", "top-right corner", "upper right corner"),
    ("middle left", "far left", "centre left", "middle of the left side", "left"),
    ("middle", "centre", "very centre", "middle of the picture", "center"),
    ("middle right", "far right", "centre right", "middle of the right side", "right"),
    ("bottom left", "lower left", "bottom-left corner", "lower left corner"),
    ("bottom middle", "lower middle", "bottom centre", "middle of the bottom row", "bottom"),
    ("bottom right", "lower right", "bottom-right corner", "lower right corner"),
)
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OPENINGS = ("", "a picture of ", "a grid with ", "on a pale background, ")

# Each edit has its own sentence templates; some use the everyday verbs (add, put, remove, take away, make, change,
# move) that any LLM writes too, in sentences of another structure than the benchmark's (a model trained from
# scratch cannot guess a verb it never read), so no benchmark sentence or sentence structure ever appears.
# an object that is already there; "{pos}" is only filled where the caller allows it
REFERENCES = ("the {color} {shape}", "the {shape} that is {color}", "the {color} {shape} in the {pos}")
# a new object (add)
NEW_OBJECTS = ("a {size} {color} {shape}", "one {size} {color} {shape}", "a {color} {shape} of {size} size")
TEXT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{new} appears in the {pos}",
        "insert {new} at the {pos}",
        "the {pos} gets {new}",
        "there is now also {new} in the {pos}",
        "place {new} at the {pos}",
        "{new} shows up in the {pos}",
        "please add {new} in the {pos}",
        "now put {new} into the {pos}",
    ),
    "remove": (
        "{ref} goes away",
        "delete {ref}",
        "get rid of {ref}",
        "{ref} disappears",
        "erase {ref}",
        "please remove {ref}",
        "now take {ref} away",
    ),
    "recolor": (
        "swap {sref}'s colour for {color}",
        "paint {ref} {color}",
        "{ref} turns {color}",
        "recolour {ref} to {color}",
        "{ref} becomes {color} instead",
        "please make {ref} {color}",
        "now change {ref} to {color}",
    ),
    "grow": (
        "{ref} grows",
        "enlarge {ref}",
        "{ref} gets bigger",
        "scale up {ref}",
        "{ref} is now large",
        "please make {ref} large",
    ),
    "shrink": ("{ref} shrinks", "{ref} gets smaller", "scale down {ref}", "{ref} is now small", "now make {ref} small"),
    "move": (
        "shift {ref} over to the {pos}",
        "{ref} now sits in the {pos}",
        "relocate {ref} to the {pos}",
        "drag {ref} into the {pos}",
        "{ref} slides to the {pos}",
        "please move {ref} to the {pos}",
        "now move {ref} into the {pos}",
    ),
}


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_POS_OF = {phrase: cell for cell, phrases in enumerate(POSITION_PHRASES) for phrase in phrases}
_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_COL, _SHP = _alternation(COLORS), _alternation(SHAPES)
_POS, _SIZ = _alternation(_POS_OF), _alternation(_SIZE_OF)
_REF_RE = rf"the (?:{_COL}) (?:{_SHP})(?: in the (?:{_POS}))?|the (?:{_SHP}) that is (?:{_COL})"
_SREF_RE = rf"the (?:{_COL}) (?:{_SHP})"
_NEW_RE = rf"(?:a|one) (?:{_SIZ}) (?:{_COL}) (?:{_SHP})|a (?:{_COL}) (?:{_SHP}) of (?:{_SIZ}) size"
_OBJECT_RE = re.compile(
    rf"(?:a (?P<z1>{_SIZ}) (?P<c1>{_COL}) (?P<s1>{_SHP})|a (?P<c2>{_COL}) (?P<s2>{_SHP}) of (?P<z2>{_SIZ}) size)"
    rf" (?:in|at) the (?P<pos>{_POS})"
)
_CAPTION_RE = re.compile(
    rf"(?:{_alternation(o for o in OPENINGS if o)})?(?P<n>{_alternation(COUNT_WORDS)}) shapes?: (?P<body>.+)\."
)


@dataclass(frozen=True)
class Change:
    """One edit, as a parsed text says it: ``kind`` in add/remove/recolor/grow/shrink/move.

    ``shape``/``color`` name the object (for add: the new one), ``cell`` is where it goes (add, move) or where it
    is said to be (a reference ``in the <position>``, else None), ``new_color`` the colour after a recolour and
    ``size`` the size of an added object.
    """

    kind: str
    shape: str
    color: str
    cell: int | None = None
    new_color: str | None = None
    size: str | None = None


def _compile_template(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    slots = {"{ref}": _REF_RE, "{sref}": _SREF_RE, "{new}": _NEW_RE, "{pos}": _POS, "{color}": _COL}
    body = "".join(f"(?P<{p[1:-1]}>{slots[p]})" if p in slots else re.escape(p) for p in parts)
    return re.compile(body)


_TEXT_PARSERS = [(kind, _compile_template(t)) for kind, ts in TEXT_TEMPLATES.items() for t in ts]


# -- scenes and edits ----------------------------------------------------------------------------------------------
def sample_scene(rng: random.Random, min_objects: int = 2, max_objects: int = 4) -> Scene:
    """A source scene like the benchmark's: distinct (shape, colour) kinds in distinct cells."""
    n = rng.randint(min_objects, max_objects)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
    cells = rng.sample(range(len(POSITIONS)), n)
    return Scene(tuple((s, c, rng.choice(SIZES), p) for (s, c), p in zip(kinds, cells)))


def sample_edit(scene: Scene, rng: random.Random, kind: str, target: int | None = None) -> Scene | None:
    """``scene`` changed by one edit of ``kind`` (add/remove/recolor/resize/move), or None if it cannot apply.

    Args:
        scene: the scene to edit.
        rng: the random stream.
        kind: the edit type.
        target: index of the object to change (default: a random one); ignored by ``add``.
    """
    objs = list(scene.objects)
    free_cells = sorted(set(range(len(POSITIONS))) - {o[3] for o in objs})
    used_kinds = {(o[0], o[1]) for o in objs}
    if kind == "add":
        if not free_cells or len(objs) >= len(POSITIONS) - 1:
            return None
        s, c = rng.choice([(s, c) for s in SHAPES for c in COLORS if (s, c) not in used_kinds])
        return Scene((*objs, (s, c, rng.choice(SIZES), rng.choice(free_cells))))
    if not objs or (kind == "remove" and len(objs) <= 1):
        return None
    i = rng.randrange(len(objs)) if target is None else target
    s, c, z, p = objs[i]
    if kind == "remove":
        objs.pop(i)
    elif kind == "recolor":
        options = [n for n in COLORS if (s, n) not in used_kinds]
        if not options:
            return None
        objs[i] = (s, rng.choice(options), z, p)
    elif kind == "resize":
        objs[i] = (s, c, "small" if z == "large" else "large", p)
    elif kind == "move":
        if not free_cells:
            return None
        objs[i] = (s, c, z, rng.choice(free_cells))
    else:
        raise ValueError(f"unknown edit kind {kind!r}; valid kinds: {', '.join(EDITS)}")
    return Scene(tuple(objs))


def diff_scenes(a: Scene, b: Scene) -> Change | None:
    """The single edit that turns ``a`` into ``b`` (a :class:`Change`), or None if they differ otherwise."""
    old, new = set(a.objects) - set(b.objects), set(b.objects) - set(a.objects)
    if not old and len(new) == 1:
        s, c, z, p = next(iter(new))
        return Change("add", s, c, cell=p, size=z)
    if not new and len(old) == 1:
        s, c, z, p = next(iter(old))
        return Change("remove", s, c, cell=p)
    if len(old) != 1 or len(new) != 1:
        return None
    (s, c, z, p), (s2, c2, z2, p2) = next(iter(old)), next(iter(new))
    same = [s == s2, c == c2, z == z2, p == p2]
    if sum(same) != 3 or s != s2:
        return None
    if c != c2:
        return Change("recolor", s, c, cell=p, new_color=c2)
    if z != z2:
        return Change("grow" if z2 == "large" else "shrink", s, c, cell=p)
    return Change("move", s, c, cell=p2)


# -- writing -----------------------------------------------------------------------------------------------------
def _position(cell: int, rng: random.Random) -> str:
    return rng.choice(POSITION_PHRASES[cell])


def write_caption(scene: Scene, rng: random.Random) -> str:
    """A whole-scene caption in this module's grammar ("three shapes: a small red circle in the top left, ...")."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    phrases = []
    for s, c, z, p in objs:
        form = rng.choice(("a {size} {color} {shape}", "a {color} {shape} of {size} size"))
        noun = form.format(size=rng.choice(SIZE_WORDS[z]), color=c, shape=s)
        phrases.append(f"{noun} {rng.choice(('in', 'at'))} the {_position(p, rng)}")
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    plural = "shape" if len(objs) == 1 else "shapes"
    return f"{rng.choice(OPENINGS)}{COUNT_WORDS[len(objs) - 1]} {plural}: {body}."


def describe_change(change: Change, old_cell: int, rng: random.Random) -> str:
    """A modification text for ``change``; ``old_cell`` is where the changed object was (for references)."""
    ref = rng.choice(REFERENCES).format(color=change.color, shape=change.shape, pos=_position(old_cell, rng))
    fields = {"ref": ref, "sref": f"the {change.color} {change.shape}"}
    if change.kind == "add":
        size = rng.choice(SIZE_WORDS[change.size or "small"])
        fields["new"] = rng.choice(NEW_OBJECTS).format(size=size, color=change.color, shape=change.shape)
    if change.cell is not None:
        fields["pos"] = _position(change.cell, rng)
    if change.new_color:
        fields["color"] = change.new_color
    return rng.choice(TEXT_TEMPLATES[change.kind]).format(**fields)


def _text_between(a: Scene, b: Scene, rng: random.Random) -> str | None:
    change = diff_scenes(a, b)
    if change is None:
        return None
    old_cell = next((o[3] for o in a.objects if (o[0], o[1]) == (change.shape, change.color)), change.cell or 0)
    return describe_change(change, old_cell, rng)


def sample_group(
    rng: random.Random, num_edits: int, min_objects: int = 2, max_objects: int = 4, cross_rate: float = 0.3
) -> tuple[Scene, list[Scene], dict]:
    """A source scene, ``num_edits`` distinct single edits of it, and the group JSON (as a dict) describing them.

    Edit types are distinct while the five last; with probability ``cross_rate`` one edit repeats an earlier
    recolour or move on the same object, so that the two edits are one edit apart (a ``cross`` text).
    """
    source = sample_scene(rng, min_objects, max_objects)
    kinds = rng.sample(EDITS, min(num_edits, len(EDITS))) + [rng.choice(EDITS) for _ in range(num_edits - len(EDITS))]
    edits: list[Scene] = []
    for kind in kinds:
        repeat = [e for e in edits if (c := diff_scenes(source, e)) and c.kind in ("recolor", "move")]
        scene = None
        if repeat and rng.random() < cross_rate:
            change = diff_scenes(source, rng.choice(repeat))
            index = [(o[0], o[1]) for o in source.objects].index((change.shape, change.color))
            scene = sample_edit(source, rng, change.kind, target=index)
        for attempt in range(50):
            if scene is not None and scene != source and scene not in edits:
                break
            scene = sample_edit(source, rng, kind if attempt < 10 else rng.choice(EDITS))
        else:
            raise RuntimeError(f"no {num_edits} distinct edits of scene {source.key}")
        edits.append(scene)
    group = {
        "source": write_caption(source, rng),
        "edits": [
            {
                "caption": write_caption(e, rng),
                "forward": _text_between(source, e, rng),
                "backward": _text_between(e, source, rng),
            }
            for e in edits
        ],
    }
    cross = []
    for i, a in enumerate(edits):
        for j, b in enumerate(edits):
            if i != j and (text := _text_between(a, b, rng)):
                cross.append({"from": i, "to": j, "text": text})
    if cross:
        group["cross"] = cross
    return source, edits, group


# -- parsing -----------------------------------------------------------------------------------------------------
def parse_caption(caption: str) -> Scene:
    """The scene a caption of this grammar describes.

    Raises:
        ValueError: the caption is not in this grammar, names a (colour, shape) or a cell twice, or its count
            word disagrees with its objects.
    """
    match = _CAPTION_RE.fullmatch(caption.strip())
    if not match:
        raise ValueError(f"not a Shapes-world caption: {caption!r}")
    objects = []
    for phrase in re.split(r", | and ", match["body"]):
        m = _OBJECT_RE.fullmatch(phrase)
        if not m:
            raise ValueError(f"cannot parse object {phrase!r} in caption {caption!r}")
        size = _SIZE_OF[m["z1"] or m["z2"]]
        objects.append((m["s1"] or m["s2"], m["c1"] or m["c2"], size, _POS_OF[m["pos"]]))
    if COUNT_WORDS.index(match["n"]) + 1 != len(objects):
        raise ValueError(f"caption says {match['n']} shapes but describes {len(objects)}: {caption!r}")
    if len({o[:2] for o in objects}) != len(objects) or len({o[3] for o in objects}) != len(objects):
        raise ValueError(f"caption names an object or a cell twice: {caption!r}")
    return Scene(tuple(objects))


def _parse_reference(text: str) -> tuple[str, str, int | None]:
    m = re.fullmatch(rf"the (?P<c>{_COL}) (?P<s>{_SHP})(?: in the (?P<p>{_POS}))?", text)
    if m:
        return m["s"], m["c"], _POS_OF[m["p"]] if m["p"] else None
    m = re.fullmatch(rf"the (?P<s>{_SHP}) that is (?P<c>{_COL})", text)
    return m["s"], m["c"], None


def parse_text(text: str) -> Change:
    """The edit a modification text of this grammar asks for.

    For ``move`` the :attr:`Change.cell` is the destination; a reference's own position is dropped.

    Raises:
        ValueError: the text matches no template of this grammar.
    """
    text = text.strip()
    for kind, pattern in _TEXT_PARSERS:
        m = pattern.fullmatch(text)
        if not m:
            continue
        fields = m.groupdict()
        if kind == "add":
            n = re.fullmatch(rf"(?:a|one) (?P<z>{_SIZ}) (?P<c>{_COL}) (?P<s>{_SHP})", fields["new"]) or re.fullmatch(
                rf"a (?P<c>{_COL}) (?P<s>{_SHP}) of (?P<z>{_SIZ}) size", fields["new"]
            )
            return Change("add", n["s"], n["c"], cell=_POS_OF[fields["pos"]], size=_SIZE_OF[n["z"]])
        shape, color, cell = _parse_reference(fields.get("ref") or fields["sref"])
        if kind == "move":
            cell = _POS_OF[fields["pos"]]
        return Change(kind, shape, color, cell=cell, new_color=fields.get("color"))
    raise ValueError(f"not a Shapes-world modification text: {text!r}")


# -- the backend ---------------------------------------------------------------------------------------------------
@register_backend
class ShapesChat(ChatBackend):
    """Grammar "LLM": ignores the conversation and writes a random Shapes group from the seed.

    Args:
        min_objects: fewest objects in a source scene (the benchmark: 2).
        max_objects: most objects in a source scene (the benchmark: 4).
        cross_rate: probability that an edit repeats an earlier recolour/move on the same object (cross texts).
    """

    def __init__(self, min_objects: int = 2, max_objects: int = 4, cross_rate: float = 0.3):
        if not 1 <= min_objects <= max_objects <= len(POSITIONS) - 1:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 8, got {min_objects}, {max_objects}")
        if not 0.0 <= cross_rate <= 1.0:
            raise ValueError(f"cross_rate is a probability, got {cross_rate}")
        self.min_objects, self.max_objects, self.cross_rate = min_objects, max_objects, cross_rate

    def settings(self) -> dict:
        return {
            **super().settings(),
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
            "cross_rate": self.cross_rate,
        }

    def generate(
        self, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int], num_edits: int
    ) -> list[str]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        answers = []
        for seed in seeds:
            rng = random.Random(f"shapes-chat:{seed}")
            group = sample_group(rng, num_edits, self.min_objects, self.max_objects, self.cross_rate)[2]
            answers.append(json.dumps(group))
        return answers
