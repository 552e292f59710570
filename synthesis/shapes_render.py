"""The picture half of the procedural Shapes world: a flawed "text-to-image model", a scorer and a judge.

:class:`ShapesRenderer` parses the captions of :mod:`.shapes_world` back to scenes and draws them with the Shapes
benchmark's geometry and colours (a neutral :class:`Style` gives the benchmark's pixels exactly), plus the flaws of a
real text-to-image model:

- **nuisance factors**: background tint, outline stroke, a shift and a scale of all objects, a colour cast, and a
  per-object position jitter and size wobble. They are drawn once per call from its seed, so the panels of one
  composite share them (an unchanged object sits at the same pixels in every panel: a consistent pair), while
  separately seeded renders of one scene differ;
- **errors**: each edit panel, with probability ``error_rate``, ignores its edit (draws the source scene) or
  changes the wrong object (the same kind of edit on another object). A one-caption render (the "separately
  seeded" ablation) has no source; it errs by one random edit of its scene with the same probability.

:class:`ShapesScorer` and :class:`ShapesJudge` read scenes back from pixels (per grid cell: background-subtracted
silhouette, dominant palette colour, extent for the size, row profile for the shape) and compare them with the
caption, or with the reference changed as the text says.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from coalign.datamodules.shapes import COLORS, Scene

from .backends import JudgeBackend, RenderBackend, ScorerBackend, make_grid, register_backend
from .shapes_world import Change, diff_scenes, parse_caption, parse_text, sample_edit

__all__ = [
    "NEUTRAL",
    "RenderPlan",
    "ShapesJudge",
    "ShapesRenderer",
    "ShapesScorer",
    "Style",
    "apply_change",
    "draw_scene",
    "plan_render",
    "read_scene",
]

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)
_MAX_EXTENT = 0.46  # half-extent (in cells) an object may reach from its cell centre: no object crosses a cell border


@dataclass(frozen=True)
class Style:
    """The nuisance factors of one render call (all lengths in cells, colours RGB)."""

    background: tuple[int, int, int] = (245, 245, 240)
    outline: tuple[int, int, int] | None = None
    stroke: int = 0
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    color_cast: tuple[int, int, int] = (0, 0, 0)
    jitter: float = 0.0
    wobble: float = 0.0
    salt: int = 0


NEUTRAL = Style()  # the benchmark's own rendering


@dataclass
class RenderPlan:
    """What one render call draws: its style, the scene of each panel and each panel's error (None if right)."""

    style: Style
    scenes: list[Scene]
    errors: list[str | None] = field(default_factory=list)


def draw_style(
    rng: random.Random, jitter: float, size_wobble: float, tint: int, stroke_rate: float, color_noise: int
) -> Style:
    """One draw of the nuisance factors."""
    base = 245 - rng.randint(0, tint)
    background = tuple(min(255, base + rng.randint(-tint // 2, tint // 2)) for _ in range(3))
    outlined = rng.random() < stroke_rate
    return Style(
        background=background,
        outline=tuple(rng.randint(20, 70) for _ in range(3)) if outlined else None,
        stroke=1 if outlined else 0,
        shift=(rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)),
        scale=1.0 + rng.uniform(-size_wobble, size_wobble),
        color_cast=tuple(rng.randint(-color_noise, color_noise) for _ in range(3)),
        jitter=jitter,
        wobble=size_wobble,
        salt=rng.randrange(2**31),
    )


def draw_scene(scene: Scene, size: int, style: Style = NEUTRAL) -> Image.Image:
    """Draw ``scene`` on a ``size`` square canvas like the benchmark's ``ShapesWorld.render``, under ``style``.

    An object's jitter and wobble depend on the style's salt and the object's (shape, colour) only, so the same
    object is drawn at the same pixels in every panel of a composite.
    """
    image = Image.new("RGB", (size, size), style.background)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for shape, color, obj_size, p in scene.objects:
        r, c = divmod(p, 3)
        own = random.Random(f"{style.salt}:{shape}:{color}")
        half = (0.45 if obj_size == "large" else 0.25) * style.scale * (1 + own.uniform(-style.wobble, style.wobble))
        half = min(half, _MAX_EXTENT)
        room = _MAX_EXTENT - half
        dx, dy = (max(-room, min(room, s + own.uniform(-style.jitter, style.jitter))) for s in style.shift)
        cx, cy, half = (c + 0.5 + dx) * cell, (r + 0.5 + dy) * cell, half * cell
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = tuple(max(0, min(255, v + d)) for v, d in zip(COLORS[color], style.color_cast))
        outline = {"outline": style.outline, "width": style.stroke} if style.stroke else {}
        if shape == "circle":
            draw.ellipse(box, fill=fill, **outline)
        elif shape == "square":
            draw.rectangle(box, fill=fill, **outline)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill, **outline)
    return image


def _same(a: Scene, b: Scene) -> bool:
    return set(a.objects) == set(b.objects)


def _wrong(source: Scene, target: Scene, rng: random.Random) -> tuple[Scene, str]:
    """The target as a flawed model draws it: the source unchanged, or the same kind of edit on another object."""
    change = diff_scenes(source, target)
    if change is not None and rng.random() < 0.5:
        kind = "resize" if change.kind in ("grow", "shrink") else change.kind
        for _ in range(20):
            wrong = sample_edit(source, rng, kind)
            if wrong is not None and not _same(wrong, source) and not _same(wrong, target):
                return wrong, "wrong_object"
    return source, "ignored"


def plan_render(
    captions: Sequence[str],
    seed: int,
    error_rate: float = 0.25,
    jitter: float = 0.06,
    size_wobble: float = 0.08,
    tint: int = 16,
    stroke_rate: float = 0.5,
    color_noise: int = 10,
) -> RenderPlan:
    """Decide everything one render call draws (a pure function of its arguments; the tests use it as truth)."""
    rng = random.Random(f"shapes-render:{seed}")
    style = draw_style(rng, jitter, size_wobble, tint, stroke_rate, color_noise)
    wanted = [parse_caption(c) for c in captions]
    plan = RenderPlan(style, [wanted[0]], [None])
    if len(wanted) == 1 and rng.random() < error_rate:
        for _ in range(20):
            wrong = sample_edit(wanted[0], rng, rng.choice(("add", "remove", "recolor", "resize", "move")))
            if wrong is not None and not _same(wrong, wanted[0]):
                plan.scenes[0], plan.errors[0] = wrong, "misdrawn"
                break
    for target in wanted[1:]:
        scene, error = target, None
        if rng.random() < error_rate:
            scene, error = _wrong(wanted[0], target, rng)
        plan.scenes.append(scene)
        plan.errors.append(error)
    return plan


# -- reading pixels ------------------------------------------------------------------------------------------------
def _shape_of(component: np.ndarray) -> str:
    rows = component.any(axis=1)
    component = component[rows][:, component.any(axis=0)]
    widths = component.sum(axis=1).astype(np.float32)
    k = max(1, len(widths) // 4)
    top, bottom = widths[:k].mean() / widths.max(), widths[-k:].mean() / widths.max()
    if top >= 0.8 and bottom >= 0.8:
        return "square"
    return "triangle" if bottom >= 0.8 and top < 0.6 else "circle"


def read_scene(image: Image.Image) -> Scene:
    """The scene seen in ``image``: per grid cell, the largest blob that differs from the background.

    The background is the image's most frequent colour; a blob's colour is the palette colour most of its pixels
    are near (outline pixels are near none), its size comes from its extent, its shape from its row profile.
    Reads are memoised on the pixels (the filters look at each panel several times).
    """
    image = image.convert("RGB")
    return _read_pixels(image.tobytes(), image.size)


@functools.lru_cache(maxsize=4096)
def _read_pixels(data: bytes, size: tuple[int, int]) -> Scene:
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(size[1], size[0], 3).astype(np.float32)
    flat = pixels.reshape(-1, 3).astype(np.int32)
    values, counts = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2], return_counts=True)
    v = int(values[counts.argmax()])
    background = np.array([v >> 16, (v >> 8) & 255, v & 255], dtype=np.float32)
    height, width = pixels.shape[:2]
    objects = []
    for p in range(9):
        r, c = divmod(p, 3)
        y0, y1, x0, x1 = (
            round(r * height / 3),
            round((r + 1) * height / 3),
            round(c * width / 3),
            round((c + 1) * width / 3),
        )
        crop = pixels[y0:y1, x0:x1]
        mask = np.abs(crop - background).max(axis=2) > 24
        if not mask.any():
            continue
        labels, n = ndimage.label(mask)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
        blob = labels == int(sizes.argmax()) + 1
        if sizes.max() < max(3, 0.04 * blob.size):
            continue
        distances = np.linalg.norm(crop[blob][:, None, :] - _PALETTE[None], axis=2)
        near = distances.min(axis=1) < 60
        if not near.any():
            continue
        color = _NAMES[int(np.bincount(distances[near].argmin(axis=1), minlength=len(_NAMES)).argmax())]
        ys, xs = np.nonzero(blob)
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / (min(height, width) / 3)
        objects.append((_shape_of(blob), color, "large" if extent > 0.77 else "small", p))
    return Scene(tuple(objects))


def _jaccard(a: Scene, b: Scene) -> float:
    x, y = set(a.objects), set(b.objects)
    return len(x & y) / len(x | y) if x | y else 1.0


def apply_change(scene: Scene, change: Change) -> Scene | None:
    """``scene`` changed as ``change`` says, or None where the change does not apply to it."""
    objs = list(scene.objects)
    cells = {o[3] for o in objs}
    index = next((i for i, o in enumerate(objs) if (o[0], o[1]) == (change.shape, change.color)), None)
    if change.kind == "add":
        if index is not None or change.cell in cells:
            return None
        return Scene((*objs, (change.shape, change.color, change.size or "small", change.cell)))
    if index is None:
        return None
    s, c, z, p = objs.pop(index)
    if change.kind != "move" and change.cell is not None and change.cell != p:
        return None  # "the red circle in the top left" but it is elsewhere
    if change.kind == "remove":
        return Scene(tuple(objs))
    if change.kind == "recolor":
        changed = (s, change.new_color, z, p)
    elif change.kind in ("grow", "shrink"):
        changed = (s, c, "large" if change.kind == "grow" else "small", p)
    else:
        changed = (s, c, z, change.cell)
    if changed in scene.objects or changed[3] in cells - {p} or any(o[:2] == changed[:2] for o in objs):
        return None
    return Scene((*objs, changed))


# -- the backends ----------------------------------------------------------------------------------------------
@register_backend
class ShapesRenderer(RenderBackend):
    """Procedural "text-to-image model" for Shapes-world captions, with nuisance factors and errors.

    Args:
        error_rate: probability that an edit panel ignores its edit or changes the wrong object.
        jitter: position jitter, in cells (a shared shift plus a per-object offset, each up to this).
        size_wobble: relative size change (shared scale and per-object wobble, each up to this).
        tint: how far the background may drift from the benchmark's (per channel, 0-255).
        stroke_rate: probability that a render outlines its shapes (a dark 1-pixel stroke).
        color_noise: colour cast of the shapes (per channel, 0-255).
    """

    def __init__(
        self,
        error_rate: float = 0.25,
        jitter: float = 0.06,
        size_wobble: float = 0.08,
        tint: int = 16,
        stroke_rate: float = 0.5,
        color_noise: int = 10,
    ):
        if not 0.0 <= error_rate <= 1.0 or not 0.0 <= stroke_rate <= 1.0:
            raise ValueError(f"error_rate and stroke_rate are probabilities, got {error_rate}, {stroke_rate}")
        self.options = {
            "error_rate": error_rate,
            "jitter": jitter,
            "size_wobble": size_wobble,
            "tint": tint,
            "stroke_rate": stroke_rate,
            "color_noise": color_noise,
        }

    def settings(self) -> dict:
        return {**super().settings(), **self.options}

    def plan(self, captions: Sequence[str], seed: int) -> RenderPlan:
        """What :meth:`render` draws for one group (see :func:`plan_render`)."""
        return plan_render(captions, seed, **self.options)

    def render(self, panels: Sequence[Sequence[str]], seeds: Sequence[int], panel_size: int) -> list[Image.Image]:
        if len(panels) != len(seeds):
            raise ValueError(f"{len(panels)} panel lists but {len(seeds)} seeds")
        out = []
        for captions, seed in zip(panels, seeds):
            plan = self.plan(captions, seed)
            images = [draw_scene(scene, panel_size, plan.style) for scene in plan.scenes]
            out.append(make_grid(images, fill="white"))
        return out


@register_backend
class ShapesScorer(ScorerBackend):
    """Caption agreement read from pixels: Jaccard overlap of the caption's objects and the objects seen.

    1.0 when every object is seen exactly as captioned and nothing else is; an unparseable caption scores 0.
    """

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        scores = []
        for image, caption in zip(images, captions):
            try:
                wanted = parse_caption(caption)
            except ValueError:
                scores.append(0.0)
                continue
            scores.append(_jaccard(wanted, read_scene(image)))
        return scores


@register_backend
class ShapesJudge(JudgeBackend):
    """Reads both scenes from pixels and checks that the text's edit turns the reference into the target.

    ``sure`` when the reference changed as the text says is exactly the target seen; otherwise at most half the
    Jaccard overlap of the two (below 0.5); 0 for a text outside the grammar or an edit that cannot apply.

    Args:
        sure: the probability given to an exact match.
    """

    def __init__(self, sure: float = 0.98):
        if not 0.5 < sure <= 1.0:
            raise ValueError(f"sure must be in (0.5, 1], got {sure}")
        self.sure = sure

    def settings(self) -> dict:
        return {**super().settings(), "sure": self.sure}

    def judge(
        self, references: Sequence[Image.Image], targets: Sequence[Image.Image], texts: Sequence[str]
    ) -> list[float]:
        if not len(references) == len(targets) == len(texts):
            raise ValueError(f"{len(references)} references, {len(targets)} targets, {len(texts)} texts")
        out = []
        for reference, target, text in zip(references, targets, texts):
            try:
                change = parse_text(text)
            except ValueError:
                out.append(0.0)
                continue
            expected = apply_change(read_scene(reference), change)
            seen = read_scene(target)
            if expected is None:
                out.append(0.0)
            elif set(expected.objects) == set(seen.objects):
                out.append(self.sure)
            else:
                out.append(0.5 * _jaccard(expected, seen))
        return out
