"""The dataset card (``README.md`` + ``stats.json``) and the preview grid (``preview.png``) of an assembled set.

The card is a ``huggingface_hub.DatasetCard``: its YAML carries ``configs:`` (the ``default`` config's parquet
files per split, which ``datasets.load_dataset`` and the Hub's dataset viewer follow), ``dataset_info`` (the
row features and the rows, i.e. groups, per split), ``size_categories``, ``task_categories``, tags and license.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData
from PIL import Image, ImageDraw

from coalign import viz
from coalign.io import atomic_save_image, atomic_write_json, atomic_write_text, read_json

from ._io import list_failures
from .config import ModelSpec, SynthesisConfig
from .groups import group_captions
from .hub_format import hub_features

__all__ = ["dataset_stats", "card_data", "write_card", "draw_preview"]


def _lengths(texts: Sequence[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts] or [0]
    return {
        "mean": round(statistics.fmean(words), 2),
        "median": statistics.median(words),
        "min": min(words),
        "max": max(words),
    }


def _report(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def dataset_stats(config: SynthesisConfig, out: Path, groups, renders, kept, triplets) -> dict[str, Any]:
    """Counts, text lengths, pass rates and the models used; also written to ``stats.json``.

    ``kept`` maps each kept group's index to its kept edit positions.
    """
    prompts, filters = _report(out / "prompts" / "report.json"), _report(out / "filter" / "report.json")
    splits = Counter(t["split"] for t in triplets)
    directions = Counter(t["direction"] for t in triplets)
    by_index = {g["index"]: g for g in groups}
    kept_groups = [by_index[i] for i in kept]
    f = config.filter
    stats = {
        "counts": {
            "groups_requested": config.prompts.num_groups,
            "group_size": config.prompts.group_size,
            "groups_valid": prompts.get("ok"),
            "groups_malformed": prompts.get("malformed"),
            "near_duplicates_removed": prompts.get("duplicates"),
            "groups_rendered": len(renders),
            "groups_kept": len(kept),
            "groups_dropped": filters.get("groups", {}).get("dropped"),
            "members_kept": sum(len(v) for v in kept.values()),
            "members_rejected": filters.get("members", {}).get("rejected"),
            "triplets": len(triplets),
            "triplets_train": splits.get("train", 0),
            "triplets_val": splits.get("val", 0),
            "groups_train": len({t["group"] for t in triplets if t["split"] == "train"}),
            "groups_val": len({t["group"] for t in triplets if t["split"] == "val"}),
            "triplets_by_direction": dict(sorted(directions.items())),
        },
        "pass_rates": {
            "overall": filters.get("pass_rate"),
            **{k: v.get("pass_rate") for k, v in filters.get("filters", {}).items()},
        },
        "text_words": _lengths([t["text"] for t in triplets]),
        "caption_words": _lengths([c for g in kept_groups for c in group_captions(g)]),
        "edit_types": dict(Counter(g["edit_type"] for g in kept_groups).most_common()),
        "domains": dict(Counter(g["domain"] for g in kept_groups).most_common()),
        "models": {
            "llm": _describe(config.prompts.backend, config.prompts.llm),
            "text_to_image": _describe(config.render.backend, config.render.model),
            "clip_filter": _describe(f.clip.backend, f.clip.model) if f.clip else None,
            "judge": _describe(f.judge.backend, f.judge.model) if f.judge else None,
        },
        "render": "one composite grid per group, split" if config.render.composite else "separately seeded panels",
        "image_size": config.render.image_size,
        "seed": config.seed,
        # an incomplete dataset says so: items whose model call failed, or not yet filtered, are missing
        "incomplete": {
            "failed_items": {
                stage: sum(1 for _ in list_failures(out, stage)) for stage in ("prompts", "render", "filter")
            },
            "filter_pending": filters.get("groups", {}).get("pending", 0),
            "not_rendered": len(groups) - len(renders),
        },
    }
    atomic_write_json(out / "stats.json", stats)
    return stats


def _describe(backend: dict[str, Any] | None, model: ModelSpec) -> str:
    return backend["class_path"] if backend is not None else model.describe()


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def card_data(
    out: Path, config: SynthesisConfig, stats: dict[str, Any], shards: dict[str, list[str]] | None
) -> DatasetCardData:
    """The card's YAML metadata. ``shards``: the parquet files per split (:func:`.hub_format.write_parquet_shards`,
    relative to ``out``); None when they were not written (no ``configs:`` nor ``dataset_info`` then: there is
    nothing to point at). A split's ``num_examples`` counts rows (groups), its ``num_bytes`` its shards' bytes."""
    c = stats["counts"]
    extra: dict[str, Any] = {}
    if shards is not None:
        splits = [split for split, files in shards.items() if files]
        extra["configs"] = [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.parquet"} for split in splits],
            }
        ]
        extra["dataset_info"] = {
            "features": hub_features()._to_yaml_list(),
            "splits": [
                {
                    "name": split,
                    "num_bytes": sum((out / name).stat().st_size for name in shards[split]),
                    "num_examples": c[f"groups_{split}"],
                }
                for split in splits
            ],
        }
        extra["dataset_info"]["download_size"] = sum(s["num_bytes"] for s in extra["dataset_info"]["splits"])
        extra["dataset_info"]["dataset_size"] = extra["dataset_info"]["download_size"]
    return DatasetCardData(
        pretty_name=config.assemble.pretty_name,
        license="other",
        size_categories=[_size_category(c["triplets"])],
        task_categories=["image-to-image"],
        tags=["composed-image-retrieval", "synthetic", "coalign"],
        **extra,
    )


def write_card(
    out: Path, config: SynthesisConfig, stats: dict[str, Any], shards: dict[str, list[str]] | None = None
) -> None:
    """A Hugging Face dataset card: YAML metadata (:func:`card_data`), how the data was made, statistics, the
    format and how to load it. ``shards``: the parquet files per split, named in the card."""
    c, m, t = stats["counts"], stats["models"], stats["text_words"]
    rates = "\n".join(f"| {k} | {v:.1%} |" if v is not None else f"| {k} | - |" for k, v in stats["pass_rates"].items())
    files = "\n".join(f"- `{name}`" for names in (shards or {}).values() for name in names) or "- (not written)"
    body = f"""
# {config.assemble.pretty_name}

Synthetic composed-image-retrieval triplets (reference image + modification text -> target image), made with
the CIRHS recipe of *Automatic Synthesis of High-Quality Triplet Data for Composed Image Retrieval*
(arXiv 2507.05970) by `coalign synthesize`: an LLM describes groups of {c["group_size"]} scenes (a source and its
edits), a text-to-image model renders each group ({stats["render"]}), filters keep the good (source, edit) pairs,
and each group is reorganised into triplets (source <-> edit, edit -> edit) that share a `group` id.

| | |
|---|---|
| LLM | `{m["llm"]}` |
| text-to-image | `{m["text_to_image"]}` ({stats["render"]}, {stats["image_size"]} px panels) |
| CLIP filter | `{m["clip_filter"]}` |
| judge | `{m["judge"]}` |

## Statistics

| | |
|---|---|
| groups requested / valid | {c["groups_requested"]} / {c["groups_valid"]} |
| groups kept / dropped by the filters | {c["groups_kept"]} / {c["groups_dropped"]} |
| groups (train / val) | {c["groups_train"]} / {c["groups_val"]} |
| edits kept / rejected | {c["members_kept"]} / {c["members_rejected"]} |
| near-duplicates removed | {c["near_duplicates_removed"]} |
| triplets (train / val) | {c["triplets"]} ({c["triplets_train"]} / {c["triplets_val"]}) |
| triplets by direction | {", ".join(f"{k} {v}" for k, v in c["triplets_by_direction"].items()) or "-"} |
| modification text words (mean / median / max) | {t["mean"]} / {t["median"]} / {t["max"]} |

| filter | pass rate |
|---|---|
{rates}

Full statistics: `stats.json`. Sample groups (panels, captions, filter decisions and scores): `preview.png`.

## Format

Parquet shards, **one row per group** (the group's images are stored once, and a streamed row is
self-contained); splits `train` and `val` (by group: a group is never split):

{files}

Columns: `group` (int: every triplet of the group shares it), `id` (group id), `domain`, `edit_type`, `panels`
(the kept panels as images, the source first), `panel_ids` (their image ids), `captions` (one per panel),
`triplets` (list of `id`, `reference` and `target` (positions in `panels`), `text` (modification text),
`direction`: `forward` source -> edit, `backward` edit -> source, `cross` edit -> edit).

```python
from datasets import load_dataset
groups = load_dataset("path/or/hub-id", split="train")          # panels decode to PIL images
row = groups[0]
for t in row["triplets"]:
    reference, target, text = row["panels"][t["reference"]], row["panels"][t["target"]], t["text"]

from coalign.datamodules import CIRHSDataModule                  # batches of triplets, chunks of one group together
dm = CIRHSDataModule(root="path/or/hub-id", batch_size=64, group_size=4)                  # memory-mapped
dm = CIRHSDataModule(root="path/or/hub-id", batch_size=64, group_size=4, streaming=True)  # larger than the disk
```

The folder written by `coalign synthesize` also holds the same triplets as `triplets.jsonl` (one JSON object per
triplet: `reference` and `target` image paths, `reference_id` and `target_id`, `text`, `group`, `split`,
`direction`, `reference_caption`, `target_caption`, `domain`, `edit_type`, `id`) and the panels under `images/`,
for local training; they are not uploaded.

## License

The images inherit the license of the text-to-image model (`{m["text_to_image"]}`) and the texts that of the
LLM (`{m["llm"]}`); check both before any use.

<details><summary>Generation config</summary>

```json
{
        json.dumps(
            {
                "seed": config.seed,
                "prompts": {
                    "num_groups": config.prompts.num_groups,
                    "group_size": config.prompts.group_size,
                    "temperature": config.prompts.temperature,
                    "top_p": config.prompts.top_p,
                },
            },
            indent=1,
        )
    }
```
</details>
"""
    card = DatasetCard(f"---\n{card_data(out, config, stats, shards).to_yaml()}\n---\n{body}")
    atomic_write_text(out / "README.md", str(card))


#: Short names of the stored filter scores (``OUT/filter/scores``), in the order they are drawn.
_SCORE_NAMES = {
    "reference_caption": "ref",
    "target_caption": "tgt",
    "caption_margin": "margin",
    "pair_similarity": "pair",
    "direction": "dir",
    "forward": "fwd",
    "backward": "bwd",
    "reference_std": "std ref",
    "target_std": "std tgt",
}
_SKIPPED_SCORES = {"min_yes", "reference_size", "target_size", "readable", "error"}
_STATUS_COLOUR = {"source": viz.INK, "kept": viz.HIT, "rejected": viz.MISS, "pending": viz.MUTED}


def _score_lines(scores: dict[str, Any], by: str | None) -> list[tuple[str, tuple]]:
    """One line per filter that scored the pair: ``clip: ref 1.00 tgt 0.33 margin 0.00``; the rejecting one red."""
    lines = []
    for name, values in scores.items():
        if not isinstance(values, dict):
            continue
        if name == "image_check" and values.get("readable", True) and by != name:
            continue  # a readable, non-blank pair: nothing to learn from its pixel statistics
        if not values.get("readable", True):
            parts = [f"unreadable ({values.get('error', 'no error recorded')})"]
        else:
            shown = [k for k in _SCORE_NAMES if k in values] + sorted(
                k for k in values if k not in _SCORE_NAMES and k not in _SKIPPED_SCORES
            )
            parts = [
                f"{_SCORE_NAMES.get(k, k)} {values[k]:.2f}"
                for k in shown
                if isinstance(values[k], (int, float)) and not isinstance(values[k], bool)
            ]
        lines.append(
            (f"{'image' if name == 'image_check' else name}: {' '.join(parts)}", viz.MISS if by == name else viz.MUTED)
        )
    return lines


def _panel_lines(panel: dict[str, Any], font, bold, width: int) -> list[tuple[str, tuple, Any]]:
    """The text under one panel: decision, modification text, caption, filter scores (text, colour, font)."""
    status, by = panel["status"], panel.get("by")
    head = {"rejected": f"REJECTED by {by}", "pending": f"pending ({by})", "kept": "kept"}.get(status, status)
    lines = [(head, _STATUS_COLOUR.get(status, viz.INK), bold)]
    if panel.get("text"):
        lines += [(t, viz.QUERY, font) for t in viz.wrap_text(f"text: {panel['text']}", font, width, 3)]
    lines += [(t, viz.INK, font) for t in viz.wrap_text(f"caption: {panel['caption']}", font, width, 4)]
    for text, colour in _score_lines(panel.get("scores") or {}, by):
        lines += [(t, colour, font) for t in viz.wrap_text(text, font, width, 2)]
    return lines


def _open_panel(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError):  # a missing or broken render (what the image check rejects): drawn as a grey box
        return None


def draw_preview(out: Path, rows: Sequence[dict[str, Any]], thumb: int = 160) -> None:
    """``preview.png``: sample groups (every panel with its decision, texts and filter scores), then rejected pairs.

    Args:
        out: the dataset folder (panel paths are relative to it).
        rows: ``{"kind", "id", "domain", "edit_type", "panels"}`` per group (``kind="group"``: the source and
            all its edits) or per rejected pair (``kind="rejected"``: the source and one rejected edit). A panel is
            ``{"path", "caption", "text", "status", "by", "scores"}``: ``text`` the modification text from the
            source (None for the source), ``status`` ``source``/``kept``/``rejected``/``pending``, ``by`` the
            deciding filter, ``scores`` the pair's stored filter scores (``{filter: {name: value}}``).
        thumb: the box each panel is fitted into (small renders are enlarged by a whole factor, NEAREST).
    """
    if not rows:
        (out / "preview.png").unlink(missing_ok=True)
        return
    font, bold, heading = viz.load_font(13), viz.load_font(13, bold=True), viz.load_font(16, bold=True)
    line_h, head_h = viz.line_height(font), viz.line_height(heading) + 8
    pad, gap, block_gap, frame = 12, 12, 36, 4
    colw = max(thumb, 200)
    groups = [r for r in rows if r.get("kind", "group") == "group"]
    rejected = [r for r in rows if r.get("kind") == "rejected"]
    cols = max([len(r["panels"]) for r in groups] + [2])
    per_line = max(1, cols // 2)  # rejected pairs side by side, as wide as a group
    # a "line" of the picture: blocks side by side, each a title and its panels
    lines = [[r] for r in groups] + [rejected[i : i + per_line] for i in range(0, len(rejected), per_line)]

    def block_width(row: dict[str, Any]) -> int:
        return len(row["panels"]) * colw + (len(row["panels"]) - 1) * gap

    texts = {id(r): [_panel_lines(p, font, bold, colw) for p in r["panels"]] for r in rows}
    heights = [
        line_h + 6 + frame + thumb + frame + 6 + max(len(t) for r in line for t in texts[id(r)]) * line_h + 14
        for line in lines
    ]
    width = pad * 2 + max(sum(block_width(r) for r in line) + block_gap * (len(line) - 1) for line in lines)
    sections = [
        (0, "Sample groups: the source, then its edits (green: kept, red: rejected by a filter)"),
        (len(groups), "Rejected pairs (not in the dataset): the source, the rejected edit, and why"),
    ]
    sections = [(at, text) for at, text in sections if (groups if at == 0 else rejected)]
    height = pad + sum(heights) + head_h * len(sections) + pad
    grid = Image.new("RGB", (width, height), viz.CANVAS)
    draw = ImageDraw.Draw(grid)
    y = pad
    for n, (line, h) in enumerate(zip(lines, heights, strict=True)):
        for at, text in sections:
            if n == at:
                draw.text((pad, y), text, fill=viz.INK, font=heading)
                draw.line([pad, y + head_h - 4, width - pad, y + head_h - 4], fill=viz.BORDER, width=1)
                y += head_h
        x = pad
        for row in line:
            bw = block_width(row)
            title = f"{row['id']} | edit type: {row['edit_type']} | {row['domain']}"
            colour = viz.MISS if row.get("kind") == "rejected" else viz.INK
            draw.text((x, y), viz.fit_line(title, bold, bw), fill=colour, font=bold)
            top = y + line_h + 6 + frame
            for k, (panel, panel_lines) in enumerate(zip(row["panels"], texts[id(row)], strict=True)):
                px = x + k * (colw + gap)
                cx = px + (colw - thumb) // 2
                image = _open_panel(out / panel["path"])
                if image is None:
                    draw.rectangle([cx, top, cx + thumb - 1, top + thumb - 1], fill=(200, 200, 200))
                    draw.text((cx + 6, top + 6), "unreadable", fill=viz.MISS, font=bold)
                else:
                    viz.paste_cell(grid, draw, image, cx, top, thumb)
                status = panel["status"]
                if status in ("kept", "rejected"):
                    viz.draw_frame(draw, cx, top, thumb, _STATUS_COLOUR[status], frame - (status == "kept"))
                for i, (text, fill, f) in enumerate(panel_lines):
                    ty = top + thumb + frame + 6 + i * line_h
                    if i == 0 and status == "rejected":  # a red banner under the image, never over it
                        draw.rectangle([px, ty - 1, px + f.getlength(text) + 8, ty + line_h - 2], fill=viz.MISS)
                        draw.text((px + 4, ty), text, fill=(255, 255, 255), font=f)
                    else:
                        draw.text((px, ty), text, fill=fill, font=f)
            x += bw + block_gap
            if row is not line[-1]:
                sx = x - block_gap // 2
                draw.line([sx, y, sx, y + h - 10], fill=(180, 180, 180), width=1)
        y += h
        draw.line([pad, y - 6, width - pad, y - 6], fill=(195, 195, 195), width=1)
    atomic_save_image(out / "preview.png", grid)
