"""Backends and groups: the registry, a whole run on registered toy backends, and the triplets of one group."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _tiny_synthesis import run_tiny, tiny_config
from PIL import Image

from coalign.io import read_json, read_jsonl
from coalign.synthesis import group_triplets, register_backend
from coalign.synthesis.backends import (
    ChatBackend,
    JudgeBackend,
    RenderBackend,
    ScorerBackend,
    build_backend,
    grid_shape,
    list_backends,
    make_grid,
    resolve_backend,
)
from coalign.synthesis.hf_backends import DiffusersRenderBackend, HFChatBackend


def test_registry_resolves_short_names_and_full_paths_and_refuses_anything_else(tmp_path):
    assert resolve_backend("HFChatBackend", ChatBackend) is HFChatBackend
    assert resolve_backend("coalign.synthesis.hf_backends.HFChatBackend", ChatBackend) is HFChatBackend
    assert "coalign.synthesis.hf_backends.MLLMJudgeBackend" in list_backends(JudgeBackend)
    with pytest.raises(ValueError, match=r"'os.system' is not a registered ChatBackend.*HFChatBackend"):
        resolve_backend("os.system", ChatBackend)
    with pytest.raises(ValueError, match="not a registered"):
        resolve_backend("coalign.synthesis.no_such_module.Thing", RenderBackend)
    with pytest.raises(ValueError, match="is a RenderBackend, not a ChatBackend"):
        resolve_backend("DiffusersRenderBackend", ChatBackend)
    with pytest.raises(ValueError, match="bad init_args"):
        build_backend("HFChatBackend", {"model": {"tiny": True}, "colour": "red"}, ChatBackend)
    with pytest.raises(ValueError, match="is not a registered ScorerBackend"):
        run_tiny(tmp_path, tiny_config("--filter.clip.backend", '{"class_path": "pickle.loads"}'), stages=("filter",))
    with pytest.raises(ValueError, match=r"render.backend must be \{class_path"):
        tiny_config("--render.backend", '{"class": "ToyRender"}')
    assert isinstance(build_backend("DiffusersRenderBackend", {"model": {"tiny": True}}, RenderBackend),
                      DiffusersRenderBackend)  # fmt: skip


# -- toy backends: a whole run with no model at all --------------------------------------------------------------
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}


@register_backend
class ToyChat(ChatBackend):
    """A group per seed: a red ball, then edits of its color; with ``broken`` the last edit's caption repeats the
    first's (an invalid answer, counted as malformed)."""

    def __init__(self, broken: bool = False):
        self.broken = broken

    def generate(self, conversations, seeds, num_edits):
        out = []
        for seed in seeds:
            names = ["blue", "green", "white"][:num_edits]
            edits = [{"caption": f"a {c} ball number {seed % 97}", "forward": f"make it {c}",
                      "backward": "make it red again"} for c in names]  # fmt: skip
            if self.broken:
                edits[-1]["caption"] = edits[0]["caption"]
            cross = [{"from": 0, "to": 1, "text": f"make it {names[1]} instead"}] if num_edits > 1 else []
            out.append(json.dumps({"source": f"a red ball number {seed % 97}", "edits": edits, "cross": cross}))
        return out


@register_backend
class ToyRender(RenderBackend):
    """Each panel filled with the color its caption names, plus seeded noise."""

    def render(self, panels, seeds, panel_size):
        images = []
        for captions, seed in zip(panels, seeds, strict=True):
            rng = np.random.default_rng(seed % 2**32)
            tiles = []
            for caption in captions:
                color = next(v for k, v in COLORS.items() if f" {k} " in f" {caption} ")
                noise = rng.integers(0, 20, (panel_size, panel_size, 3))
                tiles.append(Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)))
            images.append(make_grid(tiles))
        return images


@register_backend
class ToyScorer(ScorerBackend):
    """1 when the image's dominant color is the one the caption names; white images never match (a rejection)."""

    def score(self, images, captions):
        out = []
        for image, caption in zip(images, captions, strict=True):
            mean = np.asarray(image, np.float32).reshape(-1, 3).mean(0)
            name = min(COLORS, key=lambda k: np.abs(mean - COLORS[k]).sum())
            out.append(float(name != "white" and f" {name} " in f" {caption} "))
        return out


@register_backend
class ToyJudge(JudgeBackend):
    def judge(self, references, targets, texts):
        return [0.9] * len(texts)


def _toy_config(*overrides: str):
    spec = '{{"class_path": "{}", "init_args": {{}}}}'
    return tiny_config(
        "--prompts.backend", spec.format("ToyChat"),
        "--render.backend", spec.format("test_synthesis_backends.ToyRender"),
        "--filter.clip.backend", spec.format("ToyScorer"),
        "--filter.clip.min_caption_score", "0.5",
        "--filter.clip.min_caption_margin", "0.5",
        "--filter.judge.backend", spec.format("ToyJudge"),
        *overrides,
    )  # fmt: skip


@pytest.mark.parametrize("composite", [True, False])
def test_a_whole_run_on_registered_toy_backends(tmp_path, composite):
    config = _toy_config("--render.composite", str(composite).lower())
    assert config.prompts.backend == {"class_path": "ToyChat", "init_args": {}}
    reports = run_tiny(tmp_path, config)
    assert reports["failed"] == {} and reports["prompts"]["ok"] == 8
    # the white edit (edit 2) fails the scorer in every group: each group keeps 2 of its 3 edits
    assert reports["filter"]["members"] == {"kept": 16, "rejected": 8, "pending": 0}
    triplets = read_jsonl(tmp_path / "triplets.jsonl")
    assert len(triplets) == 8 * (2 * 2 + 1) and not any("white" in t["target_caption"] for t in triplets)
    record = read_json(next((tmp_path / "render" / "items").glob("*/*.json")))
    assert record["composite"] is composite and len(record["seeds"]) == (1 if composite else 4)
    settings = read_json(tmp_path / "render" / "settings.json")
    assert settings["backend"]["class_path"].endswith("ToyRender")
    card = (tmp_path / "README.md").read_text()
    assert "ToyChat" in card and "/ 8 |" in card  # edits kept / rejected
    assert (tmp_path / "preview.png").is_file()


def test_malformed_group_answers_are_retried_then_counted(tmp_path):
    config = _toy_config()
    config.prompts.backend = {"class_path": "ToyChat", "init_args": {"broken": True}}
    report = run_tiny(tmp_path, config, stages=("prompts",))["prompts"]
    assert report["ok"] == 0 and report["malformed"] == 8 and report["kept"] == 0
    # 1 + max_retries (2) answers per group, every rejection counted with its reason
    assert report["malformed_errors"] == {"two captions of the group are identical": 3 * 8}


def test_group_triplets_of_a_four_panel_group_with_a_rejected_edit_and_a_cross_text():
    group = {
        "id": "q00000007",
        "index": 7,
        "domain": "toys",
        "edit_type": "attribute",
        "source": "a red ball",
        "edits": [
            {"caption": "a blue ball", "forward": "make it blue", "backward": "make it red"},
            {"caption": "a green ball", "forward": "make it green", "backward": "back to red"},
            {"caption": "a white ball", "forward": "make it white", "backward": "red again"},
        ],
        "cross": [
            {"from": 0, "to": 2, "text": "blue to white"},
            {"from": 1, "to": 2, "text": "green to white"},  # its edit 1 is rejected: no triplet
        ],
    }
    paths = [f"images/00001/q00000007_p{k}.png" for k in range(4)]
    got = group_triplets(group, kept=[2, 0], paths=paths, split="val")

    def t(a, b, text, direction, captions):
        return {
            "id": f"q00000007-{a}-{b}", "reference": paths[a], "target": paths[b], "reference_id": paths[a],
            "target_id": paths[b], "text": text, "group": 7, "split": "val", "direction": direction,
            "reference_caption": captions[0], "target_caption": captions[1], "domain": "toys",
            "edit_type": "attribute",
        }  # fmt: skip

    assert got == [
        t(0, 1, "make it blue", "forward", ("a red ball", "a blue ball")),
        t(1, 0, "make it red", "backward", ("a blue ball", "a red ball")),
        t(0, 3, "make it white", "forward", ("a red ball", "a white ball")),
        t(3, 0, "red again", "backward", ("a white ball", "a red ball")),
        t(1, 3, "blue to white", "cross", ("a blue ball", "a white ball")),
    ]
    assert grid_shape(len(paths)) == (2, 2)


def test_a_backend_argument_is_set_from_the_command_line(capsys):
    """``--render.backend.init_args.X V`` changes one constructor argument and keeps the others (the parser alone
    would put X beside class_path); a stage without a backend says so in one line."""
    from coalign.synthesis.cli import load_config, synthesize_command

    base = load_config("configs/synthesis/shapes.yaml").render.backend
    config = load_config(
        "configs/synthesis/shapes.yaml",
        ["--render.backend.init_args.stroke_rate", "0", "--render.backend.init_args.tint=4", "--seed", "3"],
    )
    assert config.render.backend == {**base, "init_args": {**base["init_args"], "stroke_rate": 0, "tint": 4}}
    assert config.seed == 3
    clip = load_config("configs/synthesis/shapes.yaml", ["--filter.clip.backend.init_args.batch", "[1, 2]"])
    assert clip.filter.clip.backend["init_args"] == {"batch": [1, 2]}
    with pytest.raises(ValueError, match="render has no backend"):
        load_config("configs/synthesis/tiny.yaml", ["--render.backend.init_args.tint", "0"])
    code = synthesize_command(
        ["--config", "synthesis/tiny", "--output", "/nonexistent/x", "--render.backend.init_args.tint", "0"]
    )
    assert code == 2 and capsys.readouterr().err.strip().endswith("{class_path: ..., init_args: {...}})")
