"""Pictures people would rather look at than read: retrieval grids of queries and their ranked results.

:func:`retrieval_grid` draws one row per query: a header row (``query`` / ``#1`` ... ``#k`` / ``true target``),
the reference image with its modification text, the top-k results with their scores and image ids, the true
target framed in green where it is among them and, when it was missed, shown in a last column framed in red
with its rank. :func:`pick_examples` chooses which queries to show (distinct references, hits and misses).

The drawing helpers (:func:`load_font`, :func:`fit_image`, :func:`wrap_text`, ...) are shared with the synthesis
preview: small images (a 32-px Shapes canvas) are enlarged by a whole factor with NEAREST, so every pixel stays
a sharp square, large ones are shrunk with LANCZOS keeping their aspect; text uses a TrueType font when the
system has one, so it reads at 100% zoom.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = [
    "denormalize",
    "retrieval_grid",
    "pick_examples",
    "load_font",
    "line_height",
    "fit_image",
    "fit_line",
    "wrap_text",
    "paste_cell",
    "draw_frame",
]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

#: Colours of the pictures: a light grey canvas (so white images keep a visible edge), dark cell borders.
CANVAS = (228, 228, 228)
BORDER = (70, 70, 70)
INK = (20, 20, 20)
MUTED = (95, 95, 95)
QUERY = (25, 45, 140)
HIT = (0, 150, 40)
MISS = (210, 25, 25)
MIN_CELL = 96

_FONT_FILES = {False: ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"), True: ("DejaVuSans-Bold.ttf",)}


def denormalize(tensor: Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo ``ImageTransform``'s normalisation: ``[3, H, W]`` float tensor -> PIL image."""
    x = tensor.detach().float().cpu().clone()
    for c in range(3):
        x[c] = x[c] * std[c] + mean[c]
    array = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


@functools.lru_cache(maxsize=16)
def load_font(size: int, bold: bool = False) -> Font:
    """A TrueType font of ``size`` px (DejaVu Sans when the system has it), else Pillow's own scalable default."""
    for name in _FONT_FILES[bold] + _FONT_FILES[False]:
        try:
            return ImageFont.truetype(name, size)
        except OSError:  # not installed under that name: try the next one
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def line_height(font: Font) -> int:
    """Pixels from one text line to the next in ``font``."""
    box = font.getbbox("Ag|")
    return box[3] - min(box[1], 0) + 3


def fit_image(image: Image.Image, cell: int) -> Image.Image:
    """``image`` (RGB) sized for a ``cell`` x ``cell`` box, keeping its aspect.

    An image that fits is enlarged by the largest whole factor that still fits, with NEAREST (pixels stay sharp
    squares; a 32-px image in a 160-px cell becomes 160 px, factor 5); a larger one is shrunk with LANCZOS.
    """
    image = image.convert("RGB")
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"cannot draw an empty image of size {w}x{h}")
    if w <= cell and h <= cell:
        factor = cell // max(w, h)
        return image if factor == 1 else image.resize((w * factor, h * factor), Image.NEAREST)
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.LANCZOS)


def fit_line(text: str, font: Font, width: int, keep_end: bool = False) -> str:
    """``text`` cut (with ``...``) to fit in ``width`` px; ``keep_end`` keeps its end (ids differ at the end)."""
    if font.getlength(text) <= width:
        return text
    for n in range(len(text) - 1, 0, -1):
        cut = "..." + text[-n:] if keep_end else text[:n].rstrip() + "..."
        if font.getlength(cut) <= width:
            return cut
    return "..."


def wrap_text(text: str, font: Font, width: int, max_lines: int | None = None) -> list[str]:
    """``text`` broken into lines of at most ``width`` px (words longer than a line are cut); at most
    ``max_lines`` lines, the last one ending in ``...`` when text was left out."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > width and len(word) > 1:  # a word wider than the line: cut it
            n = 1
            while n < len(word) and font.getlength(word[: n + 1]) <= width:
                n += 1
            lines.append(word[:n])
            word = word[n:]
        line = word
    if line:
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[: max(max_lines, 0)]
        if lines:
            lines[-1] = fit_line(lines[-1] + " ...", font, width)
    return lines


def paste_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, image: Image.Image, x: int, y: int, cell: int):
    """Paste ``image`` centred in the cell at ``(x, y)`` with a dark border around the image itself."""
    thumb = fit_image(image, cell)
    w, h = thumb.size
    left, top = x + (cell - w) // 2, y + (cell - h) // 2
    canvas.paste(thumb, (left, top))
    draw.rectangle([left - 1, top - 1, left + w, top + h], outline=BORDER, width=1)


def draw_frame(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int, colour, width: int = 4) -> None:
    """A ``width``-px frame just outside the ``cell`` x ``cell`` box at ``(x, y)``."""
    draw.rectangle([x - width - 1, y - width - 1, x + cell + width, y + cell + width], outline=colour, width=width)


def _hit_position(row: dict[str, Any], k: int) -> int | None:
    """0-based position of the true target among the shown results, or None."""
    if row.get("correct") is not None:
        return int(row["correct"])
    ids, target_id = row.get("ids"), row.get("target_id")
    if ids is not None and target_id is not None and target_id in list(ids)[:k]:
        return list(ids).index(target_id)
    rank = row.get("target_rank")
    if rank is not None and 1 <= rank <= k:
        return int(rank) - 1
    return None


def _has_target(row: dict[str, Any]) -> bool:
    return any(row.get(key) is not None for key in ("target", "target_id", "target_rank"))


def _check_row(n: int, row: dict[str, Any]) -> None:
    for key in ("reference", "text", "results"):
        if key not in row:
            raise ValueError(f"retrieval_grid row {n}: missing {key!r}")
    for key in ("scores", "ids", "labels"):
        if row.get(key) is not None and len(row[key]) != len(row["results"]):
            raise ValueError(f"retrieval_grid row {n}: {len(row['results'])} results but {len(row[key])} {key}")
    rank = row.get("target_rank")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"retrieval_grid row {n}: target_rank must be a rank >= 1 or None, got {rank!r}")


def retrieval_grid(
    rows: Sequence[dict[str, Any]],
    path: str | Path | None = None,
    cell: int = 160,
    title: str | None = None,
    max_text_lines: int = 5,
) -> Image.Image:
    """Draw one row per query: the reference image and its text, its ranked results, and the missed target.

    Row keys (only the first three are required):

    * ``reference`` (PIL image), ``text`` (the modification text), ``results`` (PIL images, best first);
    * ``scores`` (one float per result) and ``ids`` (one image id per result), drawn under each result;
      ``labels`` (one free caption per result) is drawn too, and ``reference_id`` under the reference;
    * the true target: ``target_id`` (framed green where it is among ``ids``; or give ``correct``, its
      0-based position among the results), ``target`` (PIL image), ``target_rank`` (1-based rank in the whole
      gallery, None when it was not ranked) and ``target_score``. A row whose target is not among its results
      gets it drawn in an extra ``true target`` column, framed red, with its rank.

    Args:
        rows: one dict per query (keys above).
        path: where to save the PNG (optional).
        cell: side of the box each image is fitted into, at least 96 px; images that fit are enlarged by a
            whole factor with NEAREST (a 32-px image becomes 160 px), larger ones shrunk with LANCZOS.
        title: a line drawn above the grid (e.g. the model, split and metric).
        max_text_lines: lines of the modification text under the reference (the rest is cut with ``...``).

    Returns:
        The picture (RGB).
    """
    if not rows:
        raise ValueError("retrieval_grid needs at least one row")
    if cell < MIN_CELL:
        raise ValueError(f"retrieval_grid: cell must be at least {MIN_CELL} px to stay legible, got {cell}")
    for n, row in enumerate(rows):
        _check_row(n, row)
    font, bold, title_font = load_font(14), load_font(15, bold=True), load_font(18, bold=True)
    line_h, header_h = line_height(font), line_height(bold) + 8
    k = max(len(r["results"]) for r in rows)
    hits = [_hit_position(r, len(r["results"])) for r in rows]
    missed = [hit is None and _has_target(r) for r, hit in zip(rows, hits)]
    target_column = any(missed)

    # -- the text under every cell, decided before any size is known -------------------------------------------
    def result_lines(row: dict[str, Any], j: int, hit: int | None) -> list[tuple[str, tuple]]:
        lines = []
        if row.get("scores") is not None:
            score = f"{float(row['scores'][j]):.3f}"
            lines.append((f"{score}  target" if hit == j else score, HIT if hit == j else INK))
        elif hit == j:
            lines.append(("target", HIT))
        if row.get("ids") is not None:
            lines.append((fit_line(str(row["ids"][j]), font, cell, keep_end=True), MUTED))
        if row.get("labels") is not None and str(row["labels"][j]):
            lines.append((fit_line(str(row["labels"][j]), font, cell), INK))
        return lines

    def query_lines(row: dict[str, Any]) -> list[tuple[str, tuple]]:
        lines = []
        if row.get("reference_id") is not None:
            lines.append((fit_line(str(row["reference_id"]), font, cell, keep_end=True), MUTED))
        lines += [(line, QUERY) for line in wrap_text(str(row["text"]), font, cell, max_text_lines)]
        return lines

    def target_lines(row: dict[str, Any]) -> list[tuple[str, tuple]]:
        rank = row.get("target_rank")
        first = f"rank {rank}" if rank is not None else f"not in top {k}"
        if row.get("target_score") is not None:
            first += f"  {float(row['target_score']):.3f}"
        lines = [(first, MISS)]
        if row.get("target_id") is not None:
            lines.append((fit_line(str(row["target_id"]), font, cell, keep_end=True), MUTED))
        return lines

    texts = []
    for row, hit, miss in zip(rows, hits, missed):
        cells = [query_lines(row)] + [result_lines(row, j, hit) for j in range(len(row["results"]))]
        texts.append((cells, target_lines(row) if miss else []))
    text_lines = max(max(len(c) for c in cells + [tail]) for cells, tail in texts)

    # -- layout ------------------------------------------------------------------------------------------------
    pad, gap, sep, frame = 12, 14, 22, 5
    xs = [pad + frame] + [pad + frame + cell + sep + j * (cell + gap) for j in range(k)]
    target_x = xs[-1] + cell + sep if target_column else None
    width = (target_x if target_column else xs[-1]) + cell + frame + pad
    row_h = frame + cell + frame + 4 + text_lines * line_h + 10
    title_h = line_height(title_font) + 10 if title else 0
    legend = _legend(any(h is not None for h in hits), target_column)
    legend_lines = wrap_text(legend, font, width - 2 * pad) if legend else []
    top = pad + title_h + header_h
    height = top + len(rows) * row_h + len(legend_lines) * line_h + pad
    canvas = Image.new("RGB", (width, height), CANVAS)
    draw = ImageDraw.Draw(canvas)

    if title:
        draw.text((pad, pad), fit_line(title, title_font, width - 2 * pad), fill=INK, font=title_font)
    headers = [(xs[0], "query")] + [(x, f"#{j + 1}") for j, x in enumerate(xs[1:])]
    if target_column:
        headers.append((target_x, "true target"))
    for x, text in headers:
        w = draw.textlength(text, font=bold)
        draw.text((x + (cell - w) / 2, pad + title_h), text, fill=INK, font=bold)
    draw.line([pad, top - 3, width - pad, top - 3], fill=BORDER, width=1)

    for r, (row, hit, (cells, tail)) in enumerate(zip(rows, hits, texts)):
        y = top + r * row_h + frame
        paste_cell(canvas, draw, row["reference"], xs[0], y, cell)
        draw_frame(draw, xs[0], y, cell, QUERY, width=2)
        for j, image in enumerate(row["results"]):
            paste_cell(canvas, draw, image, xs[j + 1], y, cell)
            if hit == j:
                draw_frame(draw, xs[j + 1], y, cell, HIT, frame - 1)
        for x, lines in zip(xs, cells):
            for i, (text, colour) in enumerate(lines):
                draw.text((x, y + cell + frame + 4 + i * line_h), text, fill=colour, font=font)
        if tail:
            if row.get("target") is not None:
                paste_cell(canvas, draw, row["target"], target_x, y, cell)
            else:  # rank and id known, picture not given
                draw.rectangle([target_x, y, target_x + cell - 1, y + cell - 1], fill=(205, 205, 205))
            draw_frame(draw, target_x, y, cell, MISS, frame - 1)
            for i, (text, colour) in enumerate(tail):
                draw.text((target_x, y + cell + frame + 4 + i * line_h), text, fill=colour, font=font)
        elif target_column and hit is not None:
            note = f"found at #{hit + 1}"
            w = draw.textlength(note, font=font)
            draw.text((target_x + (cell - w) / 2, y + (cell - line_h) / 2), note, fill=HIT, font=font)
        if r < len(rows) - 1:
            line_y = top + (r + 1) * row_h - 5
            draw.line([pad, line_y, width - pad, line_y], fill=(190, 190, 190), width=1)
    for i, line in enumerate(legend_lines):
        draw.text((pad, top + len(rows) * row_h + i * line_h), line, fill=MUTED, font=font)

    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return canvas


def _legend(any_hit: bool, any_miss: bool) -> str:
    parts = []
    if any_hit:
        parts.append("green frame: the true target among the results")
    if any_miss:
        parts.append("red frame (last column): the true target when it was missed, with its rank")
    return "; ".join(parts)


def _default_rank(candidate: dict[str, Any]) -> int | None:
    """``target_rank`` when given, else the 1-based position of ``target_id`` in ``ranked_ids`` (None: absent)."""
    if "target_rank" in candidate:
        return candidate["target_rank"]
    ranked, target = candidate.get("ranked_ids"), candidate.get("target_id")
    if ranked is not None and target is not None and target in list(ranked):
        return list(ranked).index(target) + 1
    return None


def _default_key(candidate: dict[str, Any]) -> Any:
    return candidate.get("reference_id")


def pick_examples(
    n: int,
    candidates: Sequence[Any],
    key: Callable[[Any], Any] = _default_key,
    rank: Callable[[Any], int | None] = _default_rank,
) -> list[Any]:
    """Up to ``n`` varied example queries out of ``candidates``, in their original order.

    Half are hits (the true target at rank 1) and half misses (any other rank, or not ranked at all) when both
    exist; the larger half goes to the hits and a side that runs short leaves its places to the other. Within
    that split, candidates whose reference (``key``) was not picked yet come first, in order; a reference is
    repeated only when there are not enough distinct ones. A ``key`` of None never counts as a repeat.

    Args:
        n: how many to pick (0 or more).
        candidates: the examples to choose from (e.g. ``EvaluationOutcome.examples``), in a fixed order.
        key: a candidate's reference id (default: its ``reference_id``).
        rank: a candidate's 1-based rank of the true target, None when it was not ranked (default:
            ``target_rank``, else the position of ``target_id`` in ``ranked_ids``).
    """
    if n < 0:
        raise ValueError(f"pick_examples: n must be >= 0, got {n}")
    groups: dict[bool, list[int]] = {True: [], False: []}  # hit -> candidate positions
    for i, c in enumerate(candidates):
        groups[rank(c) == 1].append(i)
    n_miss = min(len(groups[False]), n // 2)
    n_hit = min(len(groups[True]), n - n_miss)
    n_miss = min(len(groups[False]), n - n_hit)
    quota = {True: n_hit, False: n_miss}
    # interleave hits and misses so that neither side takes every distinct reference first
    order = [i for pair in zip_longest(groups[True], groups[False]) for i in pair if i is not None]
    hit_of = {i: is_hit for is_hit, positions in groups.items() for i in positions}
    chosen: set[int] = set()
    seen: set[Any] = set()
    for distinct_only in (True, False):
        for i in order:
            if i in chosen or quota[hit_of[i]] == 0:
                continue
            ref = key(candidates[i])
            if distinct_only and ref is not None and ref in seen:
                continue
            chosen.add(i)
            quota[hit_of[i]] -= 1
            if ref is not None:
                seen.add(ref)
    return [candidates[i] for i in sorted(chosen)]
