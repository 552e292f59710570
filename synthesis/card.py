"""The dataset card (``README.md`` + ``stats.json``) and the preview grid (``preview.png``) of an assembled set."""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from coalign.io import atomic_save_image, atomic_write_json, atomic_write_text, read_json

from ._io import list_failures
from .config import ModelSpec, SynthesisConfig
from .groups import group_captions

__all__ = ["dataset_stats", "write_card", "draw_preview"]


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


def write_card(out: Path, config: SynthesisConfig, stats: dict[str, Any]) -> None:
    """A Hugging Face dataset card: YAML metadata, how the data was made, statistics and the format."""
    c, m, t = stats["counts"], stats["models"], stats["text_words"]
    rates = "\n".join(f"| {k} | {v:.1%} |" if v is not None else f"| {k} | - |" for k, v in stats["pass_rates"].items())
    card = f"""---
pretty_name: {config.assemble.pretty_name}
license: other
size_categories:
- {_size_category(c["triplets"])}
task_categories:
- image-to-image
tags:
- composed-image-retrieval
- synthetic
- coalign
---

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

`triplets.jsonl`, one JSON object per line: `reference` and `target` (image paths relative to this folder),
`reference_id` and `target_id` (image ids), `text` (modification text), `group` (int: the triplets of one
group share it), `split` (`train`/`val`), `direction` (`forward` source -> edit, `backward` edit -> source,
`cross` edit -> edit), `reference_caption`, `target_caption`, `domain`, `edit_type`, `id`.

```python
from coalign.datamodules import CIRHSDataModule
dm = CIRHSDataModule(root="path/to/this/folder", batch_size=64, group_size=4)
```

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
    atomic_write_text(out / "README.md", card)


def draw_preview(out: Path, rows: Sequence[dict[str, Any]], thumb: int = 128) -> None:
    """``preview.png``: one row per group: its panels, each with its caption and its filter decision and scores.

    Args:
        out: the dataset folder (panel paths are relative to it).
        rows: ``{"id", "panels": [paths], "captions": [...], "notes": [...]}`` per group.
        thumb: side of a panel thumbnail.
    """
    if not rows:
        (out / "preview.png").unlink(missing_ok=True)
        return
    pad, text_h = 6, 84
    cols = max(len(r["panels"]) for r in rows)
    grid = Image.new("RGB", (cols * (thumb + pad) + pad, len(rows) * (thumb + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    for n, row in enumerate(rows):
        y = pad + n * (thumb + text_h + pad)
        for k, (path, caption, note) in enumerate(zip(row["panels"], row["captions"], row["notes"], strict=True)):
            x = pad + k * (thumb + pad)
            with Image.open(out / path) as im:
                grid.paste(im.convert("RGB").resize((thumb, thumb)), (x, y))
            if note.startswith("rejected"):
                draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline="red", width=3)
            label = f"{row['id']} {note}" if k == 0 else note
            lines = [label] + textwrap.wrap(caption, width=thumb // 6)
            draw.multiline_text((x, y + thumb + 2), "\n".join(lines[:6]), fill="black", font=font)
    atomic_save_image(out / "preview.png", grid)
