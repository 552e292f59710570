"""Render stage: grid geometry (layout, split round trip, borders), grid prompts, composite and per-panel renders."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_synthesis import tiny_config
from PIL import Image

from coalign.io import read_json, write_jsonl
from coalign.synthesis import RunContext, grid_shape, split_grid
from coalign.synthesis._io import item_path
from coalign.synthesis.backends import make_grid
from coalign.synthesis.hf_backends import grid_prompt
from coalign.synthesis.render import RenderStage
from coalign.synthesis.runner import run_stage

COLORS = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (0, 255, 255), (255, 0, 255), (9, 9, 9)]


def _colors(im: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.asarray(im).reshape(-1, 3)}


@pytest.mark.parametrize(
    ("n", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)), (6, (2, 3)), (7, (3, 3))]
)
def test_grid_shape(n, shape):
    assert grid_shape(n) == shape


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_split_grid_round_trip(n):
    panels = [Image.new("RGB", (16, 16), c) for c in COLORS[:n]]
    grid = make_grid(panels)
    rows, cols = grid_shape(n)
    assert grid.size == (cols * 16, rows * 16)
    back = split_grid(grid, n)
    assert [p.size for p in back] == [(16, 16)] * n
    assert [np.asarray(p).tobytes() for p in back] == [np.asarray(p).tobytes() for p in panels]


def test_split_grid_border_removes_dividers_and_keeps_panels_square():
    grid = np.asarray(make_grid([Image.new("RGB", (64, 64), c) for c in COLORS[:4]])).copy()
    grid[:, 61:67], grid[61:67, :], grid[:3], grid[:, -3:] = 255, 255, 255, 255  # dividers and a frame
    panels = split_grid(Image.fromarray(grid), 4, border=0.0625)  # 4 px from every side of each 64 px cell
    assert [p.size for p in panels] == [(56, 56)] * 4
    assert [_colors(p) for p in panels] == [{c} for c in COLORS[:4]]
    with pytest.raises(ValueError, match="leaves nothing"):
        split_grid(Image.new("RGB", (16, 8)), 2, border=0.5)


def test_grid_prompt_names_every_panel_at_its_place():
    prompt = grid_prompt("{n_panels} in {layout}: {panels}", ["a red car.", "a blue car", "a red bus", "a red van"])
    places = "Top left: a red car. Top right: a blue car. Bottom left: a red bus. Bottom right: a red van."
    assert prompt == "4 in 2 rows of 2: " + places
    assert grid_prompt("{panels}", ["a red car", "a blue car"]) == "Left: a red car. Right: a blue car."
    assert grid_prompt("{panels}", ["a red car"]) == "a red car"  # a single panel is its own prompt
    with pytest.raises(ValueError, match="unknown placeholders"):
        tiny_config("--render.prompt_template", "{reference_caption} and {panels}")


GROUPS = [
    {
        "id": f"q{i:08d}",
        "index": i,
        "domain": "d",
        "edit_type": "attribute",
        "source": f"a red car {i}",
        "edits": [
            {"caption": f"a {c} car {i}", "forward": f"make it {c}", "backward": "make it red"}
            for c in ("blue", "green", "white")
        ],
        "cross": [],
    }
    for i in range(3)
]


def _render(out, *overrides):
    write_jsonl(out / "prompts" / "groups.jsonl", GROUPS)
    config = tiny_config(*overrides)
    summary = run_stage(RenderStage(config, RunContext(out=out, progress=False)))
    assert summary.processed == 3 and not summary.failed
    return config


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


@pytest.mark.parametrize("composite", [True, False])
def test_render_is_seeded_per_item_not_per_batch(tmp_path, composite):
    flag = str(composite).lower()
    a = _render(tmp_path / "a", "--render.composite", flag, "--render.batch_size", "3")
    _render(tmp_path / "b", "--render.composite", flag, "--render.batch_size", "1")
    size = a.render.image_size
    for i in range(3):
        record = read_json(item_path(tmp_path / "a" / "render" / "items", i, a.shard_size))
        assert record["composite"] is composite and len(record["panels"]) == 4
        assert len(record["seeds"]) == (1 if composite else 4) and len(set(record["seeds"])) == len(record["seeds"])
        assert record["captions"][0] == GROUPS[i]["source"]
        for path in record["panels"]:
            assert Image.open(tmp_path / "a" / path).size == (size, size)
            # per-item seeds: the same image whatever the batch, up to floating-point noise of batched kernels
            assert np.abs(_pixels(tmp_path / "a" / path) - _pixels(tmp_path / "b" / path)).max() <= 2
        if composite:
            grid = Image.open(tmp_path / "a" / record["composite_image"])
            assert grid.size == (2 * size, 2 * size)
            panels = [np.asarray(p) for p in split_grid(grid, 4)]
            assert all(
                np.array_equal(p, np.asarray(Image.open(tmp_path / "a" / q))) for p, q in zip(panels, record["panels"])
            )
        else:
            assert record["composite_image"] is None
            # separately seeded renders: panels share nothing but their caption prefix, so they differ
            first, second = (_pixels(tmp_path / "a" / p) for p in record["panels"][:2])
            assert np.abs(first - second).max() > 10
