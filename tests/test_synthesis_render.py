"""Render stage: split geometry of composites, diptych prompts, per-item seeding, and loading by name."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_synthesis import tiny_config
from PIL import Image

from coalign.io import read_json, write_jsonl
from coalign.synthesis import RunContext, split_composite
from coalign.synthesis._io import item_path
from coalign.synthesis.render import RenderStage, diptych_prompt
from coalign.synthesis.runner import run_stage


def _composite(width: int, height: int, divider: int = 0) -> Image.Image:
    """Red left half, blue right half, an optional white divider centred on the seam."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width - width // 2 :] = (0, 0, 255)
    if width % 2:
        a[:, width // 2] = (0, 255, 0)  # the middle column of an odd width belongs to neither half
    if divider:
        a[:, width // 2 - divider : width - width // 2 + divider] = 255
        a[:divider], a[-divider:] = 255, 255  # and a frame
    return Image.fromarray(a)


def _colors(im: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.asarray(im).reshape(-1, 3)}


def test_split_halves_without_border():
    left, right = split_composite(_composite(64, 32))
    assert left.size == right.size == (32, 32)
    assert _colors(left) == {(255, 0, 0)} and _colors(right) == {(0, 0, 255)}


def test_split_odd_width_drops_the_middle_column():
    left, right = split_composite(_composite(65, 32))
    assert left.size == right.size == (32, 32)
    assert _colors(left) == {(255, 0, 0)} and _colors(right) == {(0, 0, 255)}


def test_split_border_removes_divider_and_frame_and_keeps_halves_square():
    # border 0.0625 of a 64 px half = 4 px from every side; the divider is 3 px on each side of the seam
    left, right = split_composite(_composite(128, 64, divider=3), border=0.0625)
    assert left.size == right.size == (56, 56)
    assert _colors(left) == {(255, 0, 0)} and _colors(right) == {(0, 0, 255)}
    with pytest.raises(ValueError, match="leaves nothing"):
        split_composite(_composite(16, 8), border=0.5)


def test_diptych_prompt_names_both_captions_once():
    quad = {"reference_caption": "a red car.", "target_caption": "a blue car"}
    prompt = diptych_prompt("Left: {reference_caption}. Right: {target_caption}.", quad)
    assert prompt == "Left: a red car. Right: a blue car."
    with pytest.raises(ValueError, match="unknown placeholders"):
        tiny_config("--render.prompt_template", "{reference_caption} and {forward}")


QUADS = [
    {
        "id": f"q{i:08d}",
        "index": i,
        "domain": "d",
        "edit_type": "attribute",
        "reference_caption": f"a red car {i}",
        "target_caption": f"a blue car {i}",
        "forward": "make it blue",
        "backward": "make it red",
    }
    for i in range(3)
]


def _render(out, *overrides):
    write_jsonl(out / "prompts" / "quadruples.jsonl", QUADS)
    config = tiny_config(*overrides)
    summary = run_stage(RenderStage(config, RunContext(out=out, progress=False)))
    assert summary.processed == 3 and not summary.failed
    return config


@pytest.mark.parametrize("strategy", ["diptych", "separate"])
def test_render_is_seeded_per_item_not_per_batch(tmp_path, strategy):
    a = _render(tmp_path / "a", "--render.strategy", strategy, "--render.batch_size", "3")
    _render(tmp_path / "b", "--render.strategy", strategy, "--render.batch_size", "1")
    size = a.render.image_size
    for i in range(3):
        record = read_json(item_path(tmp_path / "a" / "render" / "items", i, a.shard_size))
        assert record["strategy"] == strategy and len(record["prompts"]) == (1 if strategy == "diptych" else 2)
        for key in ("reference", "target"):
            im_a, im_b = Image.open(tmp_path / "a" / record[key]), Image.open(tmp_path / "b" / record[key])
            assert im_a.size == (size, size)
            # per-item seeds: the same image whatever the batch, up to floating-point noise of batched kernels
            assert np.abs(np.asarray(im_a, np.int16) - np.asarray(im_b, np.int16)).max() <= 2
        if strategy == "diptych":
            composite = Image.open(tmp_path / "a" / record["composite"])
            assert composite.size == (2 * size, size)
            assert np.array_equal(
                np.asarray(composite)[:, :size], np.asarray(Image.open(tmp_path / "a" / record["reference"]))
            )
