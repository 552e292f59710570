"""Stage 2, render: a diffusers text-to-image pipeline turns each quadruple into a reference and a target image.

**Diptych (default).** One composite, ``2 * image_size`` wide and ``image_size`` high, is rendered from a prompt
naming both captions (``render.prompt_template``; the default asks for "a diptych: two side-by-side photographs
of the same scene with the same subject identity, style, lighting and camera", then "Left photograph: <reference
caption>. Right photograph: <target caption>."). Both halves come out of one denoising run, so they share
identity, style and lighting, which two separately seeded renders rarely do.

**Split geometry** (:func:`split_composite`): the left half is columns ``[0, W//2)`` and the right half columns
``[W - W//2, W)`` (an odd middle column belongs to neither). From each half, ``border * W//2`` pixels are trimmed
on all four sides, because diptych renders often draw a divider or a frame; with a ``W = 2H`` composite each half
stays square.

**Separate.** The two captions are rendered as two ``image_size`` squares from the same seed (same initial noise).

Seeds derive from the global seed and the item id, with one CPU ``torch.Generator`` per prompt, so an item's
initial noise does not depend on its batch (its pixels then differ across batch compositions by floating-point
noise only, and not at all on a resumed run, see :mod:`.runner`).

Artifacts under ``OUT/render/``: ``images/<shard>/<id>_ref.png`` and ``<id>_tgt.png`` (plus ``<id>_composite.png``
with ``keep_composite``), then ``items/<shard>/<id>.json``, written last, which marks the item complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from coalign.io import atomic_save_image, atomic_write_json, read_json

from . import models
from ._io import derive_seed, existing_items, item_id, item_path
from .config import SynthesisConfig
from .prompts import load_quadruples
from .runner import RunContext, Stage

__all__ = ["RenderStage", "diptych_prompt", "split_composite", "load_renders"]


def diptych_prompt(template: str, quad: dict[str, str]) -> str:
    """Fill the diptych template; captions lose a trailing period since the template adds its own."""
    return template.format(
        reference_caption=quad["reference_caption"].rstrip(" ."),
        target_caption=quad["target_caption"].rstrip(" ."),
    )


def split_composite(image: Image.Image, border: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """Cut a side-by-side composite into its left (reference) and right (target) halves.

    Args:
        image: the composite, ``W`` wide and ``H`` high.
        border: fraction of the half width ``W // 2`` trimmed from every edge of each half.

    Returns:
        ``(left, right)``, each ``(W // 2 - 2b) x (H - 2b)`` with ``b = round(border * (W // 2))``.
    """
    width, height = image.size
    half = width // 2
    b = round(border * half)
    if half - 2 * b <= 0 or height - 2 * b <= 0:
        raise ValueError(f"border {border} leaves nothing of a {width}x{height} composite")
    left = image.crop((b, b, half - b, height - b))
    right = image.crop((width - half + b, b, width - b, height - b))
    return left, right


class RenderStage(Stage):
    """Render each quadruple of ``prompts/quadruples.jsonl``; see the module docstring."""

    name = "render"

    def __init__(self, config: SynthesisConfig, ctx: RunContext):
        super().__init__(ctx, config.shard_size)
        self.config = config.render
        self.seed = config.seed
        self.batch_size = self.config.batch_size
        self.root = ctx.out / "render"
        self.quads = {q["index"]: q for q in load_quadruples(ctx.out)}
        self.pipe = None

    def items(self) -> list[int]:
        return sorted(self.quads)

    def is_done(self, index: int) -> bool:
        return item_path(self.root / "items", index, self.shard_size).is_file()

    def done_items(self, indices: Sequence[int]) -> set[int]:
        return existing_items(self.root / "items", indices, self.shard_size)

    def setup(self) -> None:
        self.pipe = models.load_diffusion_pipeline(self.config.model, self.ctx.device, self.config.cpu_offload)

    def teardown(self) -> None:
        self.pipe = None
        models.free_memory()

    def _render(self, prompts: list[str], seeds: list[int], width: int, height: int) -> list[Image.Image]:
        cfg = self.config
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        images = self.pipe(
            prompt=prompts,
            height=height,
            width=width,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=generators,
            **cfg.call_kwargs,
        ).images
        if len(images) != len(prompts) or any(im.size != (width, height) for im in images):
            got = sorted({im.size for im in images})
            raise RuntimeError(f"the pipeline returned {len(images)} images of sizes {got}, expected {width}x{height}")
        return images

    def process(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        cfg = self.config
        quads = [self.quads[i] for i in indices]
        seeds = [derive_seed(self.seed, "render", i) for i in indices]
        size = cfg.image_size
        if cfg.strategy == "diptych":
            prompts = [diptych_prompt(cfg.prompt_template, q) for q in quads]
            composites = self._render(prompts, seeds, 2 * size, size)
            halves = [split_composite(c, cfg.border) for c in composites]
            return [
                {"seed": s, "prompts": [p], "composite": c, "reference": h[0], "target": h[1]}
                for s, p, c, h in zip(seeds, prompts, composites, halves, strict=True)
            ]
        prompts = [caption for q in quads for caption in (q["reference_caption"], q["target_caption"])]
        images = self._render(prompts, [s for s in seeds for _ in range(2)], size, size)
        return [
            {
                "seed": s,
                "prompts": prompts[2 * k : 2 * k + 2],
                "composite": None,
                "reference": images[2 * k],
                "target": images[2 * k + 1],
            }
            for k, s in enumerate(seeds)
        ]

    def write(self, index: int, result: dict[str, Any]) -> None:
        name = item_id(index)
        folder = item_path(self.root / "images", index, self.shard_size).parent
        rel = folder.relative_to(self.ctx.out)
        record = {
            "id": name,
            "index": index,
            "strategy": self.config.strategy,
            "seed": result["seed"],
            "prompts": result["prompts"],
            "model": self.config.model.describe(),
        }
        for key, suffix in (("reference", "ref"), ("target", "tgt"), ("composite", "composite")):
            if key == "composite" and (result[key] is None or not self.config.keep_composite):
                continue
            atomic_save_image(folder / f"{name}_{suffix}.png", result[key])
            record[key] = str(rel / f"{name}_{suffix}.png")
        # the record goes last: its presence is what marks the images as complete
        atomic_write_json(item_path(self.root / "items", index, self.shard_size), record)


def load_renders(out: Path, indices: Sequence[int], shard_size: int) -> dict[int, dict[str, Any]]:
    """Render records of the given items that are complete."""
    done = existing_items(out / "render" / "items", indices, shard_size)
    return {i: read_json(item_path(out / "render" / "items", i, shard_size)) for i in sorted(done)}
