"""Stage 2, render: a render backend draws each group as ONE composite grid of panels, split into its images.

**Composite (default, ``render.composite: true``).** The panels of a group (its source caption first, then each
edit's) are rendered together as one image, a grid laid out by :func:`.backends.grid_shape` (1x2 for a pair,
2x2 for 3-4 panels, 2x3 for 5-6), each cell ``image_size`` square. All panels come out of one denoising run, so
they share identity, style and lighting, which separately seeded renders rarely do. :func:`.backends.split_grid`
then cuts the composite into its panels, trimming ``border * image_size`` pixels from every edge of each (the
dividers and frames such renders often draw). The default backend's prompt is :func:`.hf_backends.grid_prompt`.

**Separately seeded renders (``composite: false``, the ablation).** Each panel is rendered alone from its own
caption (a one-caption ``render`` call) with its own seed.

Seeds derive from the global seed and the item id (and the panel, for separate renders), with one CPU generator
per image in the default backend, so an item's initial noise does not depend on its batch.

Artifacts under ``OUT/render/``: ``images/<shard>/<id>_p<k>.png`` for panel ``k`` (0 = source, ``k`` = edit
``k - 1``), plus ``<id>_composite.png`` with ``keep_composite``; then ``items/<shard>/<id>.json``, written last,
which marks the item complete: ``{id, index, composite, seeds, panels: [paths], captions, composite_image}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from coalign.io import atomic_save_image, atomic_write_json, read_json

from ._io import derive_seed, existing_items, item_id, item_path
from .backends import RenderBackend, grid_shape, split_grid
from .config import SynthesisConfig
from .groups import group_captions
from .hf_backends import render_backend
from .prompts import load_groups
from .runner import RunContext, Stage

__all__ = ["RenderStage", "load_renders", "panel_seeds"]


def panel_seeds(seed: int, index: int, n_panels: int, composite: bool) -> list[int]:
    """The seed of a composite (one), or of each separately rendered panel (one per panel)."""
    if composite:
        return [derive_seed(seed, "render", index)]
    return [derive_seed(seed, "render", index, panel) for panel in range(n_panels)]


class RenderStage(Stage):
    """Render each group of ``prompts/groups.jsonl``; see the module docstring.

    Args:
        config: the synthesis config.
        ctx: this rank's context.
        backend: the render backend (default: built from ``config.render``).
    """

    name = "render"

    def __init__(self, config: SynthesisConfig, ctx: RunContext, backend: RenderBackend | None = None):
        super().__init__(ctx, config.shard_size)
        self.config = config.render
        self.seed = config.seed
        self.batch_size = self.config.batch_size
        self.root = ctx.out / "render"
        self.groups = {g["index"]: g for g in load_groups(ctx.out)}
        self.backend = backend if backend is not None else render_backend(self.config)

    def items(self) -> list[int]:
        return sorted(self.groups)

    def is_done(self, index: int) -> bool:
        return item_path(self.root / "items", index, self.shard_size).is_file()

    def done_items(self, indices: Sequence[int]) -> set[int]:
        return existing_items(self.root / "items", indices, self.shard_size)

    def setup(self) -> None:
        self.backend.setup(self.ctx.device)

    def teardown(self) -> None:
        self.backend.teardown()

    def _render(self, panels: list[list[str]], seeds: list[int]) -> list[Image.Image]:
        size = self.config.image_size
        images = self.backend.render(panels, seeds, size)
        for captions, image in zip(panels, images, strict=True):
            rows, cols = grid_shape(len(captions))
            if image.size != (cols * size, rows * size):
                raise RuntimeError(
                    f"the render backend drew {image.size[0]}x{image.size[1]} for {len(captions)} panels; "
                    f"expected {cols * size}x{rows * size} ({rows}x{cols} panels of {size})"
                )
        return images

    def process(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        cfg = self.config
        captions = [group_captions(self.groups[i]) for i in indices]
        seeds = [panel_seeds(self.seed, i, len(c), cfg.composite) for i, c in zip(indices, captions, strict=True)]
        if cfg.composite:
            composites = self._render(captions, [s[0] for s in seeds])
            return [
                {"seeds": s, "captions": c, "composite": im, "panels": split_grid(im, len(c), cfg.border)}
                for s, c, im in zip(seeds, captions, composites, strict=True)
            ]
        singles = self._render([[c] for cs in captions for c in cs], [s for ss in seeds for s in ss])
        results, start = [], 0
        for s, c in zip(seeds, captions, strict=True):
            panels = [split_grid(im, 1, cfg.border)[0] for im in singles[start : start + len(c)]]
            results.append({"seeds": s, "captions": c, "composite": None, "panels": panels})
            start += len(c)
        return results

    def write(self, index: int, result: dict[str, Any]) -> None:
        name = item_id(index)
        folder = item_path(self.root / "images", index, self.shard_size).parent
        rel = folder.relative_to(self.ctx.out)
        record = {
            "id": name,
            "index": index,
            "composite": self.config.composite,
            "seeds": result["seeds"],
            "captions": result["captions"],
            "panels": [],
            "composite_image": None,
        }
        for k, panel in enumerate(result["panels"]):
            atomic_save_image(folder / f"{name}_p{k}.png", panel)
            record["panels"].append(str(rel / f"{name}_p{k}.png"))
        if result["composite"] is not None and self.config.keep_composite:
            atomic_save_image(folder / f"{name}_composite.png", result["composite"])
            record["composite_image"] = str(rel / f"{name}_composite.png")
        # the record goes last: its presence is what marks the images as complete
        atomic_write_json(item_path(self.root / "items", index, self.shard_size), record)


def load_renders(out: Path, indices: Sequence[int], shard_size: int) -> dict[int, dict[str, Any]]:
    """Render records of the given items that are complete."""
    done = existing_items(out / "render" / "items", indices, shard_size)
    return {i: read_json(item_path(out / "render" / "items", i, shard_size)) for i in sorted(done)}
