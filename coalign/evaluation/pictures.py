"""The picture of retrieval results that ``fit``/``test`` (:class:`~coalign.callbacks.RetrievalReport`) and
``coalign evaluate`` write: a few varied queries, their top results with scores and ids, the missed targets.

Both collect examples while ranking with :func:`collect_examples` and draw them with :func:`draw_examples`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from ..viz import denormalize, pick_examples, retrieval_grid

__all__ = ["MAX_EXAMPLES", "collect_examples", "draw_examples", "picture_title"]

MAX_EXAMPLES = 64  # queries kept per evaluation to choose the picture's rows from


def picture_title(what: str, metrics: dict[str, Any]) -> str:
    """``what``, plus the R@1 of ``metrics`` when it has one (``R@1``, ``shapes/R@1``, ``dress/R@1``: the first)."""
    recall = next((float(v) for k, v in metrics.items() if k.rsplit("/", 1)[-1] == "R@1"), None)
    return what if recall is None else f"{what}: R@1 {recall:.2f}%"


def collect_examples(
    examples: list[dict[str, Any]],
    batch: dict[str, Any],
    index: Tensor,
    scores: Tensor,
    gallery_ids: Sequence[str],
    per_batch: int = 4,
    limit: int = MAX_EXAMPLES,
) -> None:
    """Append up to ``per_batch`` queries of ``batch`` (until ``limit`` in all) to ``examples``.

    Each example: ``reference`` (the reference tensor), ``reference_id``, ``text``, ``target_id`` (the first
    one when a query has several), ``target_rank`` (1-based within the ranking, None when not in it),
    ``ranked_ids`` and ``ranked_scores`` (the top 10). Taking a few of every batch, rather than the first
    batch's, gives :func:`draw_examples` varied references to choose from.
    """
    take = max(0, min(len(index), per_batch, limit - len(examples)))
    targets = batch.get("target_id", [""] * len(index))
    references = batch.get("reference_id", [None] * len(index))
    for i in range(take):
        ranked = [gallery_ids[j] for j in index[i].tolist()]
        target = targets[i]
        if isinstance(target, (list, tuple)):  # several ground truths (CIRCO): show the first
            target = target[0] if target else ""
        target = "" if target is None else str(target)
        examples.append(
            {
                "reference": batch["reference"][i].cpu(),
                "reference_id": None if references[i] is None else str(references[i]),
                "text": batch["text"][i] if "text" in batch else "",
                "target_id": target,
                "target_rank": ranked.index(target) + 1 if target in ranked else None,
                "ranked_ids": ranked[:10],
                "ranked_scores": [round(float(v), 4) for v in scores[i, :10].tolist()],
            }
        )


def draw_examples(
    examples: Sequence[dict[str, Any]],
    gallery,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
    title: str | None = None,
    num_examples: int = 6,
    top_k: int = 5,
) -> Image.Image | None:
    """Draw ``num_examples`` varied examples (distinct references, hits and misses) to ``path``.

    Args:
        examples: from :func:`collect_examples`.
        gallery: the gallery dataset (``entries`` = ``(image_id, ...)`` pairs, items ``{"image": tensor}``).
        mean, std: the image transform's normalisation, to turn tensors back into pictures.
        path: the PNG to write.
        title: a line above the grid.
        num_examples: rows.
        top_k: results per row.

    Returns:
        The picture, or None when there is nothing to draw (no examples, or a gallery without ``entries``).
    """
    if not examples or not hasattr(gallery, "entries"):
        return None
    position = {str(image_id): i for i, (image_id, *_) in enumerate(gallery.entries)}

    def image(image_id: str) -> Image.Image:
        return denormalize(gallery[position[image_id]]["image"], mean, std)

    rows = []
    for ex in pick_examples(num_examples, examples):
        ids = [i for i in ex["ranked_ids"][:top_k] if i in position]
        scores = [s for i, s in zip(ex["ranked_ids"], ex.get("ranked_scores", [])) if i in ids]
        row: dict[str, Any] = {
            "reference": denormalize(ex["reference"], mean, std),
            "reference_id": ex.get("reference_id"),
            "text": ex["text"],
            "results": [image(i) for i in ids],
            "ids": ids,
            "target_id": ex["target_id"],
        }
        if len(scores) == len(ids):
            row["scores"] = scores
        if ex["target_id"] and ex["target_id"] not in ids and ex["target_id"] in position:
            row.update(target=image(ex["target_id"]), target_rank=ex.get("target_rank"))
        rows.append(row)
    return retrieval_grid(rows, path, title=title)
