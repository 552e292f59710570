"""The procedural Shapes world of the synthesis pipeline (synthesis/shapes_world.py, synthesis/shapes_render.py).

Its grammar writes parseable groups in its own words (never a benchmark sentence), its renderer draws them with the
benchmark's pixels plus the flaws of a text-to-image model, and its scorer and judge catch most of those flaws.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest

from coalign.datamodules.shapes import COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES, ShapesDataModule, ShapesWorld
from coalign.synthesis import synthesize_command
from coalign.synthesis.backends import (
    ChatBackend,
    JudgeBackend,
    RenderBackend,
    ScorerBackend,
    grid_shape,
    resolve_backend,
    split_grid,
)
from coalign.synthesis.shapes_render import (
    NEUTRAL,
    ShapesJudge,
    ShapesRenderer,
    ShapesScorer,
    apply_change,
    draw_scene,
    plan_render,
    read_scene,
)
from coalign.synthesis.shapes_world import ShapesChat, parse_caption, parse_text, sample_group

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthesis" / "shapes.yaml"


def _groups(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [sample_group(rng, 3) for _ in range(n)]


def _background(array: np.ndarray) -> bytes:
    colours, counts = np.unique(array.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()].tobytes()


def _texts(groups) -> list[str]:
    out = []
    for _, _, g in groups:
        out += [t for e in g["edits"] for t in (e["forward"], e["backward"])] + [c["text"] for c in g.get("cross", [])]
    return out


def test_captions_and_texts_parse_back_to_the_scenes_and_edits():
    for source, edits, group in _groups(300):
        assert set(parse_caption(group["source"]).objects) == set(source.objects)
        for scene, edit in zip(edits, group["edits"]):
            assert set(parse_caption(edit["caption"]).objects) == set(scene.objects)
            assert set(apply_change(source, parse_text(edit["forward"])).objects) == set(scene.objects)
            assert set(apply_change(scene, parse_text(edit["backward"])).objects) == set(source.objects)
        for cross in group.get("cross", []):
            changed = apply_change(edits[cross["from"]], parse_text(cross["text"]))
            assert set(changed.objects) == set(edits[cross["to"]].objects)


def test_parsers_refuse_other_grammars_with_a_clear_error():
    with pytest.raises(ValueError, match="not a Shapes-world caption"):
        parse_caption("a red dress with long sleeves")
    with pytest.raises(ValueError, match="says two shapes but describes 1"):
        parse_caption("two shapes: a small red circle in the top left.")
    with pytest.raises(ValueError, match="not a Shapes-world modification text"):
        parse_text("remove the red circle")  # a benchmark sentence


def _benchmark_sentences() -> set[str]:
    """Every sentence the benchmark's templates can produce (a few thousand), enumerated exhaustively."""
    fields = {"size": SIZES, "color": list(COLORS), "shape": SHAPES, "pos": POSITIONS, "new": [*COLORS, *SIZES]}
    out = set()
    for template in itertools.chain.from_iterable(TEMPLATES.values()):
        names = re.findall(r"\{(\w+)\}", template)
        for values in itertools.product(*(fields[n] for n in names)):
            out.add(template.format(**dict(zip(names, values))))
    return out


def test_no_benchmark_sentence_or_template_in_the_synthesized_texts():
    sentences = _benchmark_sentences()
    assert len(sentences) > 1000
    patterns = [  # each benchmark template with any words in its slots: our sentence structures must differ
        re.compile(re.sub(r"\\\{\w+\\\}", r"[\\w -]+", re.escape(t)))
        for t in itertools.chain.from_iterable(TEMPLATES.values())
    ]
    texts = _texts(_groups(300, seed=1))
    assert len(texts) > 1800
    assert not sentences & set(texts)
    assert [t for t in texts if any(p.fullmatch(t) for p in patterns)] == []
    # and the benchmark's actual test split texts, as the DataModule writes them
    records, _ = ShapesDataModule(num_eval_sources=50).build_split("test")
    assert not {r["text"] for r in records} & set(texts)


def test_chat_backend_is_seeded_registered_and_answers_valid_group_json():
    chat = resolve_backend("ShapesChat", ChatBackend)()
    conversations = [[{"role": "user", "content": "anything"}]] * 3
    answers = chat.generate(conversations, [1, 2, 1], num_edits=3)
    assert answers[0] == answers[2] != answers[1]
    group = json.loads(answers[1])
    assert len(group["edits"]) == 3 and {"caption", "forward", "backward"} <= set(group["edits"][0])
    assert chat.settings()["class_path"].endswith("shapes_world.ShapesChat")
    with pytest.raises(ValueError, match="probability"):
        ShapesChat(cross_rate=2.0)
    assert sum(bool(g.get("cross")) for _, _, g in _groups(100)) > 20  # cross texts are common


def test_neutral_style_draws_the_benchmark_pixels():
    world, rng = ShapesWorld(32), random.Random(3)
    for _ in range(50):
        scene = world.sample_scene(rng)
        assert np.array_equal(np.asarray(world.render(scene)), np.asarray(draw_scene(scene, 32, NEUTRAL)))


def test_render_is_deterministic_and_lays_panels_out_on_the_grid():
    renderer = resolve_backend("ShapesRenderer", RenderBackend)()
    groups = _groups(3)
    panels = [[g["source"]] + [e["caption"] for e in g["edits"]] for _, _, g in groups]
    first = renderer.render(panels, [5, 6, 7], panel_size=32)
    again = renderer.render(panels, [5, 6, 7], panel_size=32)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    rows, cols = grid_shape(4)
    assert first[0].size == (cols * 32, rows * 32)
    single = renderer.render([[panels[0][0]]], [5], panel_size=48)[0]
    assert single.size == (48, 48)


def test_panels_of_a_composite_share_nuisance_factors_while_separate_renders_differ():
    renderer = ShapesRenderer(error_rate=0.0)
    shared = differ = 0
    for k, (source, edits, g) in enumerate(_groups(60, seed=2)):
        captions = [g["source"]] + [e["caption"] for e in g["edits"]]
        panels = split_grid(renderer.render([captions], [k], 32)[0], 4)
        arrays = [np.asarray(p) for p in panels]
        # the same tint everywhere, and an object the edit left alone sits at the very same pixels
        assert len({_background(a) for a in arrays}) == 1
        for scene, array in zip(edits, arrays[1:]):
            for obj in set(source.objects) & set(scene.objects):
                r, c = divmod(obj[3], 3)
                cell = (
                    slice(round(r * 32 / 3), round((r + 1) * 32 / 3)),
                    slice(round(c * 32 / 3), round((c + 1) * 32 / 3)),
                )
                shared += np.array_equal(arrays[0][cell], array[cell])
        a, b = (np.asarray(renderer.render([[g["source"]]], [seed], 32)[0]) for seed in (2 * k, 2 * k + 1))
        differ += not np.array_equal(a, b)
    assert differ >= 58
    assert shared > 100


def test_errors_are_injected_at_the_configured_rate():
    groups = _groups(400, seed=4)
    errors = []
    for k, (source, edits, g) in enumerate(groups):
        plan = plan_render([g["source"]] + [e["caption"] for e in g["edits"]], k, error_rate=0.25)
        for scene, drawn, error in zip(edits, plan.scenes[1:], plan.errors[1:]):
            errors.append(error)
            assert (error is None) == (set(drawn.objects) == set(scene.objects))
            if error == "ignored":
                assert set(drawn.objects) == set(source.objects)
    rate = sum(e is not None for e in errors) / len(errors)
    assert 0.21 <= rate <= 0.29, rate
    assert {"ignored", "wrong_object"} <= set(errors)
    assert all(e is None for e in plan_render([groups[0][2]["source"]] * 4, 0, error_rate=0.0).errors)


def test_scenes_are_read_back_from_pixels():
    renderer = ShapesRenderer(error_rate=0.0)
    right = total = 0
    for k, (_, _, g) in enumerate(_groups(150, seed=5)):
        plan = renderer.plan([g["source"]] + [e["caption"] for e in g["edits"]], k)
        for scene in plan.scenes:
            total += 1
            right += set(read_scene(draw_scene(scene, 32, plan.style)).objects) == set(scene.objects)
    assert right / total >= 0.98


def test_scorer_and_judge_reject_most_errors_and_keep_most_correct_panels():
    """The filter of configs/synthesis/shapes.yaml: caption score >= 0.99 both, margin >= 0, judge >= 0.5 both ways."""
    renderer = ShapesRenderer(error_rate=0.25)
    scorer, judge = resolve_backend("ShapesScorer", ScorerBackend)(), resolve_backend("ShapesJudge", JudgeBackend)()
    kept = {True: 0, False: 0}
    seen = {True: 0, False: 0}
    for k, (_, _, g) in enumerate(_groups(100, seed=6)):
        captions = [g["source"]] + [e["caption"] for e in g["edits"]]
        panels = split_grid(renderer.render([captions], [k], 32)[0], 4)
        plan = renderer.plan(captions, k)
        for n, edit in enumerate(g["edits"], start=1):
            pair = [panels[0], panels[n]]
            own = scorer.score(pair, [captions[0], captions[n]])
            other = scorer.score(pair, [captions[n], captions[0]])
            margin = min(own[0] - other[0], own[1] - other[1])
            verdict = min(
                judge.judge([panels[0]], [panels[n]], [edit["forward"]])
                + judge.judge([panels[n]], [panels[0]], [edit["backward"]])
            )
            passed = min(own) >= 0.99 and margin >= 0 and verdict >= 0.5
            correct = plan.errors[n] is None
            seen[correct] += 1
            kept[correct] += passed
    assert seen[False] >= 40
    assert 1 - kept[False] / seen[False] >= 0.8, (kept, seen)
    assert kept[True] / seen[True] >= 0.9, (kept, seen)


def test_scorer_and_judge_give_zero_for_text_outside_the_grammar():
    image = draw_scene(parse_caption("one shape: a small red circle in the middle."), 32)
    assert ShapesScorer().score([image], ["a photo of a dog"]) == [0.0]
    assert ShapesJudge().judge([image], [image], ["make it blue"]) == [0.0]


def test_config_header_names_the_command_and_its_measured_time():
    header = [line for line in CONFIG.read_text().splitlines() if line.startswith("#")]
    assert any("coalign synthesize --config configs/synthesis/shapes.yaml" in line for line in header)
    assert any(re.search(r"measured: .*\d+ s", line) for line in header)


def test_the_shapes_config_runs_the_whole_pipeline(tmp_path):
    start = time.perf_counter()
    status = synthesize_command(["--config", str(CONFIG), "--output", str(tmp_path), "--prompts.num_groups", "40"])
    assert status == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    counts = stats["counts"]
    assert counts["groups_valid"] == 40 and counts["members_rejected"] > 0 and counts["triplets"] > 100
    triplets = [json.loads(line) for line in (tmp_path / "triplets.jsonl").read_text().splitlines()]
    assert len(triplets) == counts["triplets"]
    assert time.perf_counter() - start < 60
