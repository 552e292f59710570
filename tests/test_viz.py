"""The pictures: retrieval grids (layout, sharp enlargement, hit and miss frames, the old call), the choice of
example queries, and the synthesis preview (rejected pairs drawn when given)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coalign import viz
from coalign.synthesis.assemble import _preview_rows
from coalign.synthesis.card import draw_preview
from coalign.viz import fit_image, pick_examples, retrieval_grid, wrap_text

COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 160, 0), (120, 0, 160), (0, 150, 150)]


def solid(colour, size=32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def runs(line: np.ndarray, colour) -> list[tuple[int, int]]:
    """(start, length) of every run of exactly ``colour`` along a row of pixels ``[W, 3]``."""
    mask = np.all(line == np.array(colour, dtype=np.uint8), axis=-1).astype(np.int8)
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def find(picture: Image.Image, colour) -> tuple[int, int] | None:
    """Top-left pixel of ``colour`` in the picture, None when absent."""
    hits = np.argwhere(np.all(np.asarray(picture) == np.array(colour, dtype=np.uint8), axis=-1))
    return (int(hits[0][1]), int(hits[0][0])) if len(hits) else None


# -- drawing helpers ------------------------------------------------------------------------------------------


def test_small_images_are_enlarged_by_a_whole_factor_with_nearest():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = fit_image(Image.fromarray(pixels), 160)
    assert big.size == (160, 160)  # factor 5
    assert np.array_equal(np.asarray(big), pixels.repeat(5, axis=0).repeat(5, axis=1))  # sharp squares, no blur
    assert fit_image(Image.fromarray(pixels[:, :30]), 100).size == (90, 96)  # factor 3 keeps the aspect
    assert fit_image(Image.fromarray(pixels), 32).size == (32, 32)  # exactly fits: untouched


def test_large_images_are_shrunk_keeping_their_aspect():
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    assert fit_image(image, 160).size == (160, 107)
    assert fit_image(Image.new("L", (224, 224), 5), 160).mode == "RGB"


def test_wrap_text_fits_the_width_and_cuts_with_dots():
    font = viz.load_font(14)
    text = "replace the small red square in the top left corner with a large blue circle " * 3
    lines = wrap_text(text, font, 120)
    assert len(lines) > 3 and all(font.getlength(line) <= 120 for line in lines)
    assert " ".join(lines) == text.strip()  # nothing lost when not cut
    cut = wrap_text(text, font, 120, max_lines=3)
    assert len(cut) == 3 and cut[:2] == lines[:2] and cut[2].endswith("...")
    long_word = wrap_text("x" * 200, font, 50)
    assert "".join(long_word) == "x" * 200 and all(font.getlength(line) <= 50 for line in long_word)


# -- retrieval grid -------------------------------------------------------------------------------------------


def row(k=3, **extra):
    return {
        "reference": solid(COLOURS[0]),
        "text": "make it blue",
        "results": [solid(COLOURS[1 + j]) for j in range(k)],
        "scores": [0.9 - 0.1 * j for j in range(k)],
        "ids": [f"img{j}" for j in range(k)],
        **extra,
    }


def test_columns_are_query_then_results_in_rank_order_each_a_whole_cell():
    picture = retrieval_grid([row(k=3)], cell=160)
    reference_at = find(picture, COLOURS[0])
    line = np.asarray(picture)[reference_at[1] + 80]  # through the middle of the first row
    found = [runs(line, c) for c in COLOURS[:4]]
    assert all(len(r) == 1 and r[0][1] == 160 for r in found)  # 32 px x 5, one cell each
    starts = [r[0][0] for r in found]
    assert starts == sorted(starts)  # query, #1, #2, #3 from left to right
    steps = np.diff(starts[1:])
    assert len(set(steps.tolist())) == 1 and steps[0] >= 160  # results evenly spaced, never overlapping


def test_one_more_result_adds_one_column_and_one_more_row_adds_one_row():
    base = retrieval_grid([row(k=2)])
    wider = retrieval_grid([row(k=3)])
    taller = retrieval_grid([row(k=2), row(k=2)])
    column = wider.width - base.width
    assert 160 <= column < 200 and wider.height == base.height
    assert taller.width == base.width and taller.height - base.height >= 160
    three = retrieval_grid([row(k=2)] * 3)
    assert three.height - taller.height == taller.height - base.height  # every row the same height


def test_the_missed_target_gets_its_own_red_framed_column_only_when_missed():
    target = solid(COLOURS[5])
    hit = retrieval_grid([row(target=target, target_id="img1", target_rank=2)])
    miss = retrieval_grid([row(target=target, target_id="elsewhere", target_rank=17)])
    plain = retrieval_grid([row()])
    assert find(hit, COLOURS[5]) is None and hit.width == plain.width  # found: no extra column
    assert miss.width > plain.width + 160
    x, y = find(miss, COLOURS[5])
    assert x > find(miss, COLOURS[3])[0]  # the last column
    assert tuple(np.asarray(miss)[y + 80, x - 3]) == viz.MISS  # framed red
    # the hit: result #2 (COLOURS[2]) framed green, nothing red anywhere
    hx, hy = find(hit, COLOURS[2])
    assert tuple(np.asarray(hit)[hy + 80, hx - 3]) == viz.HIT
    assert find(hit, viz.MISS) is None
    # a grid with one miss row and one hit row: the column exists, the hit row's cell holds no image
    both = retrieval_grid([row(target=target, target_id="img0"), row(target=target, target_id="x", target_rank=9)])
    assert both.width == miss.width and len(runs(np.asarray(both)[find(both, COLOURS[5])[1] + 80], COLOURS[5])) == 1


def test_a_miss_without_a_picture_still_shows_where_the_target_ranked():
    picture = retrieval_grid([row(target_id="img99", target_rank=40)])
    assert picture.width > retrieval_grid([row()]).width and find(picture, viz.MISS) is not None


def test_the_old_call_still_works(tmp_path):
    rows = [
        {"reference": solid(COLOURS[0]), "text": "old", "results": [solid(c) for c in COLOURS[1:3]], "correct": 1},
        {"reference": solid(COLOURS[0], 64), "text": "no labels", "results": [solid(COLOURS[3])], "labels": ["0.5"]},
    ]
    picture = retrieval_grid(rows, tmp_path / "sub" / "grid.png")
    saved = Image.open(tmp_path / "sub" / "grid.png")
    assert saved.size == picture.size and np.array_equal(np.asarray(saved), np.asarray(picture))
    x, y = find(picture, COLOURS[2])
    assert tuple(np.asarray(picture)[y + 10, x - 3]) == viz.HIT  # `correct` frames the second result green
    assert find(picture, viz.MISS) is None  # no target information: no miss column


def test_white_images_stay_visible_on_the_canvas():
    picture = np.asarray(retrieval_grid([{"reference": solid((255, 255, 255)), "text": "", "results": []}]))
    assert tuple(picture[0, 0]) == viz.CANVAS != (255, 255, 255)
    assert np.all(picture == viz.BORDER, axis=-1).any()  # dark border around the cell


def test_a_title_adds_a_line_above_the_grid():
    assert retrieval_grid([row()], title="CIRR val").height > retrieval_grid([row()]).height


@pytest.mark.parametrize(
    "rows, cell, message",
    [
        ([], 160, "at least one row"),
        ([row(scores=[0.5])], 160, "row 0: 3 results but 1 scores"),
        ([row(), row(ids=["a"])], 160, "row 1: 3 results but 1 ids"),
        ([row(target_rank=0)], 160, "target_rank"),
        ([{"reference": solid(COLOURS[0]), "results": []}], 160, "row 0: missing 'text'"),
        ([row()], 64, "at least 96 px"),
    ],
)
def test_bad_rows_get_one_clear_error(rows, cell, message):
    with pytest.raises(ValueError, match=message):
        retrieval_grid(rows, cell=cell)


# -- choosing the examples ------------------------------------------------------------------------------------


def cands(*pairs):
    return [{"reference_id": ref, "target_rank": rank, "n": n} for n, (ref, rank) in enumerate(pairs)]


def picked(chosen):
    return [c["n"] for c in chosen]


def test_pick_examples_mixes_hits_and_misses_with_distinct_references():
    candidates = cands(("A", 1), ("A", 1), ("B", 1), ("C", 5), ("C", None), ("D", 2))
    assert picked(pick_examples(4, candidates)) == [0, 2, 3, 5]  # A, B hits; C, D misses; original order
    assert picked(pick_examples(3, candidates)) == [0, 2, 3]  # odd: the extra place goes to a hit
    assert picked(pick_examples(0, candidates)) == []
    assert picked(pick_examples(10, candidates)) == [0, 1, 2, 3, 4, 5]


def test_pick_examples_fills_from_the_other_side_and_repeats_references_last():
    only_hits = cands(("A", 1), ("A", 1), ("B", 1), ("B", 1))
    assert picked(pick_examples(2, only_hits)) == [0, 2]
    assert picked(pick_examples(3, only_hits)) == [0, 1, 2]  # distinct first, then the earliest repeat
    one_miss = cands(("A", 1), ("B", 1), ("C", 1), ("D", 3))
    assert picked(pick_examples(4, one_miss)) == [0, 1, 2, 3]
    assert picked(pick_examples(2, one_miss)) == [0, 3]
    no_ids = [{"target_rank": 1, "n": 0}, {"target_rank": 1, "n": 1}]  # unknown references never repeat
    assert picked(pick_examples(2, no_ids)) == [0, 1]


def test_pick_examples_reads_ranked_ids_and_custom_keys():
    candidates = [
        {"ref": "A", "target_id": "t", "ranked_ids": ["t", "u"]},  # hit
        {"ref": "A", "target_id": "t", "ranked_ids": ["u", "t"]},  # miss (rank 2)
        {"ref": "B", "target_id": "t", "ranked_ids": ["u", "v"]},  # miss (not ranked)
        {"ref": "C", "target_id": "t", "ranked_ids": ["t"]},  # hit
    ]
    assert pick_examples(2, candidates, key=lambda c: c["ref"]) == [candidates[0], candidates[2]]
    assert pick_examples(2, candidates, key=lambda c: None) == [candidates[0], candidates[1]]
    with pytest.raises(ValueError, match="n must be >= 0"):
        pick_examples(-1, candidates)


# -- synthesis preview ----------------------------------------------------------------------------------------


def preview_panel(path, status, by=None, scores=None, text="turn it blue"):
    return {"path": path, "caption": "a red square", "text": text, "status": status, "by": by, "scores": scores or {}}


def test_the_preview_draws_rejected_pairs_when_given(tmp_path):
    for name, colour in (("p0", COLOURS[0]), ("p1", COLOURS[1]), ("p2", COLOURS[2])):
        solid(colour).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    clip = {"reference_caption": 0.31, "target_caption": 0.12, "caption_margin": -0.02}
    group = {
        "kind": "group",
        "id": "q1",
        "domain": "shapes",
        "edit_type": "colour",
        "panels": [
            preview_panel("p0.png", "source", text=None),
            preview_panel("p1.png", "kept", scores={"clip": clip, "judge": {"forward": 0.9, "min_yes": 0.9}}),
        ],
    }
    draw_preview(tmp_path, [group])
    alone = Image.open(tmp_path / "preview.png").convert("RGB")
    assert find(alone, viz.MISS) is None and find(alone, viz.HIT) is not None  # kept: green, nothing red
    assert find(alone, COLOURS[1]) is not None
    rejected = [
        {**group, "kind": "rejected", "panels": [group["panels"][0], preview_panel("p2.png", "rejected", "clip")]},
        {**group, "kind": "rejected", "panels": [group["panels"][0], preview_panel("broken.png", "rejected", "x")]},
    ]
    draw_preview(tmp_path, [group, *rejected])
    both = Image.open(tmp_path / "preview.png").convert("RGB")
    assert both.height > alone.height and find(both, COLOURS[2]) is not None
    red = find(both, viz.MISS)
    assert red is not None and red[1] > find(both, COLOURS[1])[1]  # marked red, below the groups
    draw_preview(tmp_path, [])
    assert not (tmp_path / "preview.png").exists()


def test_preview_rows_show_groups_then_rejected_pairs_by_every_filter():
    groups = [
        {
            "index": i,
            "id": f"q{i}",
            "domain": "shapes",
            "edit_type": "colour",
            "source": f"source {i}",
            "edits": [{"caption": f"edit {i}.{k}", "forward": f"fwd {i}.{k}", "backward": "b"} for k in range(2)],
        }
        for i in range(6)
    ]
    renders = {i: {"panels": [f"g{i}_p{k}.png" for k in range(3)]} for i in range(6)}
    decisions = {i: [("kept", None), ("kept", None)] for i in range(6)}
    decisions[1] = [("kept", None), ("rejected", "clip")]
    decisions[2] = [("rejected", "clip"), ("rejected", "judge")]
    decisions[3] = [("rejected", "image_check"), ("rejected", "image_check")]
    scores = {i: [{"clip": {"target_caption": 0.1 * i}}, {}] for i in range(6)}
    rows = _preview_rows(groups, renders, decisions, scores, count=2, seed=0)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["group", "group", "rejected"]  # count // 2 rejected pairs
    assert rows[0]["id"] == "q1"  # the group with kept and rejected members comes first
    first = rows[0]["panels"]
    assert [p["status"] for p in first] == ["source", "kept", "rejected"] and first[2]["by"] == "clip"
    assert first[0]["text"] is None and first[1]["text"] == "fwd 1.0" and first[1]["caption"] == "edit 1.0"
    assert first[1]["scores"] == {"clip": {"target_caption": 0.1}} and first[1]["path"] == "g1_p1.png"
    many = _preview_rows(groups, renders, decisions, scores, count=8, seed=0)
    pairs = [r for r in many if r["kind"] == "rejected"]
    assert len(pairs) == 4 and all(len(r["panels"]) == 2 and r["panels"][1]["status"] == "rejected" for r in pairs)
    assert {r["panels"][1]["by"] for r in pairs[:3]} == {"clip", "image_check", "judge"}  # every reason shows
    assert _preview_rows(groups, renders, decisions, scores, count=8, seed=0) == many  # seeded, repeatable
    assert _preview_rows(groups, renders, decisions, scores, count=0, seed=0) == []
