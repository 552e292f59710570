"""The dataset card (``README.md`` + ``stats.json``) and the preview grid (``preview.png``) of an assembled set."""

from __future__ import annotations

import json
import random
import statistics
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from coalign.io import atomic_save_image, atomic_write_json, atomic_write_text, read_json

from ._io import list_failures
from .config import SynthesisConfig

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


def dataset_stats(config: SynthesisConfig, out: Path, quads, renders, kept, triplets) -> dict[str, Any]:
    """Counts, text lengths, pass rates and the models used; also written to ``stats.json``."""
    prompts, filters = _report(out / "prompts" / "report.json"), _report(out / "filter" / "report.json")
    splits = Counter(t["split"] for t in triplets)
    f = config.filter
    stats = {
        "counts": {
            "quadruples_requested": config.prompts.num_quadruples,
            "quadruples_valid": prompts.get("ok"),
            "quadruples_malformed": prompts.get("malformed"),
            "near_duplicates_removed": prompts.get("duplicates"),
            "quadruples_rendered": len(renders),
            "quadruples_kept": len(kept),
            "groups": len(kept),
            "triplets": len(triplets),
            "triplets_train": splits.get("train", 0),
            "triplets_val": splits.get("val", 0),
        },
        "pass_rates": {
            "overall": filters.get("pass_rate"),
            **{k: v.get("pass_rate") for k, v in filters.get("filters", {}).items()},
        },
        "text_words": _lengths([t["text"] for t in triplets]),
        "caption_words": _lengths([q[k] for q in kept for k in ("reference_caption", "target_caption")]),
        "edit_types": dict(Counter(q["edit_type"] for q in kept).most_common()),
        "domains": dict(Counter(q["domain"] for q in kept).most_common()),
        "models": {
            "llm": config.prompts.llm.describe(),
            "text_to_image": config.render.model.describe(),
            "clip_filter": f.clip.model.describe() if f.clip else None,
            "judge": f.judge.model.describe() if f.judge else None,
        },
        "render_strategy": config.render.strategy,
        "image_size": config.render.image_size,
        "seed": config.seed,
        # an incomplete dataset says so: items whose model call failed, or not yet filtered, are missing
        "incomplete": {
            "failed_items": {
                stage: sum(1 for _ in list_failures(out, stage)) for stage in ("prompts", "render", "filter")
            },
            "filter_pending": filters.get("pending", 0),
            "not_rendered": len(quads) - len(renders),
        },
    }
    atomic_write_json(out / "stats.json", stats)
    return stats


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
(arXiv 2507.05970) by `coalign synthesize`: an LLM writes caption quadruples, a text-to-image model renders
each as one {stats["render_strategy"]} image pair, filters keep the good pairs, and each pair gives two triplets
(forward and backward) that share a `group`.

| | |
|---|---|
| LLM | `{m["llm"]}` |
| text-to-image | `{m["text_to_image"]}` ({stats["render_strategy"]}, {stats["image_size"]} px halves) |
| CLIP filter | `{m["clip_filter"]}` |
| judge | `{m["judge"]}` |

## Statistics

| | |
|---|---|
| quadruples requested / valid / kept | {c["quadruples_requested"]} / {c["quadruples_valid"]} / {c["quadruples_kept"]} |
| near-duplicates removed | {c["near_duplicates_removed"]} |
| triplets (train / val) | {c["triplets"]} ({c["triplets_train"]} / {c["triplets_val"]}) |
| groups | {c["groups"]} |
| modification text words (mean / median / max) | {t["mean"]} / {t["median"]} / {t["max"]} |

| filter | pass rate |
|---|---|
{rates}

Full statistics: `stats.json`. Sample triplets: `preview.png`.

## Format

`triplets.jsonl`, one JSON object per line: `reference` and `target` (image paths relative to this folder),
`text` (modification text), `group` (triplets of one source pair share it), `split` (`train`/`val`),
`direction` (`forward`/`backward`), `reference_caption`, `target_caption`, `domain`, `edit_type`, `id`.

```python
from coalign.datamodules import CIRHSDataModule
dm = CIRHSDataModule(root="path/to/this/folder", batch_size=64, group_size=2)
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
                    "num_quadruples": config.prompts.num_quadruples,
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


def draw_preview(out: Path, triplets: Sequence[dict[str, Any]], count: int, seed: int, thumb: int = 160) -> None:
    """``preview.png``: one row per sampled triplet: reference | modification text | target."""
    if not triplets or count <= 0:
        (out / "preview.png").unlink(missing_ok=True)
        return
    rows = random.Random(seed).sample(list(triplets), min(count, len(triplets)))
    text_w, pad = 2 * thumb, 6
    grid = Image.new("RGB", (2 * thumb + text_w + 4 * pad, len(rows) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=13)
    for n, t in enumerate(rows):
        y = pad + n * (thumb + pad)
        for x, key in ((pad, "reference"), (3 * pad + thumb + text_w, "target")):
            with Image.open(out / t[key]) as im:
                grid.paste(im.convert("RGB").resize((thumb, thumb)), (x, y))
        lines = textwrap.wrap(f"{t['text']}  [{t['direction']}, group {t['group']}]", width=text_w // 7)
        draw.multiline_text((2 * pad + thumb, y + 4), "\n".join(lines[:9]), fill="black", font=font)
    atomic_save_image(out / "preview.png", grid)
