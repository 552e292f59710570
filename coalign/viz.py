"""Pictures people would rather look at than read: retrieval grids of queries and their ranked results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["denormalize", "retrieval_grid"]


def denormalize(tensor: Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo ``ImageTransform``'s normalisation: ``[3, H, W]`` float tensor -> PIL image."""
    x = tensor.detach().float().cpu().clone()
    for c in range(3):
        x[c] = x[c] * std[c] + mean[c]
    array = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def retrieval_grid(
    rows: Sequence[dict],
    path: str | Path | None = None,
    cell: int = 128,
    text_height: int = 44,
) -> Image.Image:
    """Draw one row per query: the reference image with its text, then its ranked results.

    Args:
        rows: dicts with ``reference`` (PIL image), ``text`` (str), ``results`` (list of PIL images), and
            optionally ``labels`` (one caption per result, e.g. a score or a name) and ``correct`` (the
            position of the true target among the results, or None): it is framed in green.
        path: where to save the PNG (optional).
        cell: side of each thumbnail in pixels.
        text_height: pixels under each thumbnail for text.
    """
    if not rows:
        raise ValueError("retrieval_grid needs at least one row")
    columns = 1 + max(len(r["results"]) for r in rows)
    pad = 6
    width = columns * (cell + pad) + pad + 10
    height = len(rows) * (cell + text_height + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        y = pad + r * (cell + text_height + pad)
        canvas.paste(row["reference"].convert("RGB").resize((cell, cell), Image.NEAREST), (pad, y))
        draw.rectangle([pad - 2, y - 2, pad + cell + 1, y + cell + 1], outline=(60, 60, 200), width=2)
        for i, line in enumerate(_wrap(row["text"], max(8, cell // 6))[:3]):
            draw.text((pad, y + cell + 2 + 12 * i), line, fill=(20, 20, 120), font=font)
        labels = row.get("labels") or [""] * len(row["results"])
        for j, (image, label) in enumerate(zip(row["results"], labels)):
            x = pad + 10 + (j + 1) * (cell + pad)
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            if row.get("correct") == j:
                draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], outline=(0, 170, 0), width=4)
            draw.text((x, y + cell + 2), f"#{j + 1} {label}"[: cell // 6], fill=(0, 0, 0), font=font)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return canvas
