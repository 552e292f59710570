"""Filter stage: decisions on constructed embeddings, bad images, the judge, and thresholds without rescoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_synthesis import baseline_dataset, copy_dataset, dataset_fingerprint, run_tiny, tiny_config
from PIL import Image

from coalign.io import read_json, read_jsonl
from coalign.synthesis import ImageCheck, ModelSpec, PairInput
from coalign.synthesis._io import item_path
from coalign.synthesis.backends import ScorerBackend
from coalign.synthesis.config import ClipFilterConfig, ImageCheckConfig, JudgeConfig
from coalign.synthesis.filter import load_scores
from coalign.synthesis.hf_backends import CLIPScorerBackend, MLLMJudgeBackend
from coalign.synthesis.model_filters import CLIPScoreFilter, JudgeFilter, clip_scores

E = torch.eye(4)  # e0, e1: what the captions say; e2: an unrelated element; e3: what both halves share
CLIP = CLIPScoreFilter(ClipFilterConfig(model=ModelSpec(tiny=True), min_pair_similarity=0.4))


def _decide(ref, tgt, ref_text=E[0], tgt_text=E[1]) -> tuple[bool, dict[str, float]]:
    scores = {k: float(v[0]) for k, v in clip_scores(ref[None], tgt[None], ref_text[None], tgt_text[None]).items()}
    return CLIP.passes(scores), scores


def test_clip_filter_keeps_a_consistent_edit():
    ok, s = _decide(E[0] + E[3], E[1] + E[3])
    assert ok
    assert s["reference_caption"] == pytest.approx(2**-0.5) and s["caption_margin"] == pytest.approx(2**-0.5)
    assert s["pair_similarity"] == pytest.approx(0.5) and s["direction"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("ref", "tgt", "failing"),
    [
        (E[0] + E[3], E[0] + E[3], "pair_similarity"),  # the edit did not happen: near-duplicates
        (E[0], E[1], "pair_similarity"),  # nothing shared: two unrelated images
        (E[1] + E[3], E[0] + E[3], "direction"),  # halves swapped: the change runs backwards
        (E[2] + E[3], E[1] + E[3], "reference_caption"),  # the reference does not show its caption
        (E[0] + 2 * E[1] + E[3], E[1] + E[3], "caption_margin"),  # the reference fits the other caption better
    ],
)
def test_clip_filter_rejects(ref, tgt, failing):
    ok, s = _decide(ref, tgt)
    assert not ok
    c = CLIP.config
    bad = {
        "pair_similarity": not c.min_pair_similarity <= s["pair_similarity"] <= c.max_pair_similarity,
        "direction": s["direction"] < c.min_direction,
        "reference_caption": s["reference_caption"] < c.min_caption_score,
        "caption_margin": s["caption_margin"] < c.min_caption_margin,
    }
    assert bad[failing], s


def test_image_check_catches_blank_unreadable_and_missing_images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "noise.png")
    Image.new("RGB", (16, 16), (128, 128, 128)).save(tmp_path / "blank.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "noise.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("not an image")
    check = ImageCheck(ImageCheckConfig(min_std=4.0))
    names = ["noise", "blank", "truncated", "text", "missing"]
    pairs = [PairInput(i, 0, {}, tmp_path / "noise.png", tmp_path / f"{n}.png") for i, n in enumerate(names)]
    scores = check.score(pairs)
    assert [check.passes(s) for s in scores] == [True, False, False, False, False]
    assert scores[1]["readable"] and scores[1]["target_std"] == 0
    assert [s["readable"] for s in scores[2:]] == [False] * 3 and "No such file" in scores[4]["error"]


def _noise_pairs(tmp_path, pair: dict, count: int = 2) -> list[PairInput]:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(tmp_path / f"{name}.png")
    return [PairInput(i, 0, pair, tmp_path / "a.png", tmp_path / "b.png") for i in range(count)]


PAIR = {"reference_caption": "a red car", "target_caption": "a blue car", "forward": "make it blue", "backward": "red"}


@pytest.mark.parametrize("both", [False, True])
def test_judge_scores_pairs_with_a_tiny_image_text_to_text_model(tmp_path, both):
    judge = JudgeFilter(JudgeConfig(model=ModelSpec(tiny=True), both_directions=both, min_yes_probability=0.5))
    assert isinstance(judge.backend, MLLMJudgeBackend)
    judge.setup(torch.device("cpu"))
    scores = judge.score(_noise_pairs(tmp_path, PAIR))
    assert set(scores[0]) == ({"forward", "backward", "min_yes"} if both else {"forward", "min_yes"})
    assert all(0 < p < 1 for p in scores[0].values())
    assert scores[0]["min_yes"] == min(v for k, v in scores[0].items() if k != "min_yes")
    assert scores[0] == scores[1]  # same pair, same answer, whatever its row in the batch
    assert judge.passes(scores[0]) == (scores[0]["min_yes"] >= 0.5)


class _WordScorer(ScorerBackend):
    """Scores without embeddings: 1 when the caption says "red" and the image is reddish, else 0."""

    def score(self, images, captions):
        return [float(("red" in c) == (np.asarray(im)[..., 0].mean() > 128)) for im, c in zip(images, captions)]


def test_clip_filter_with_a_scorer_without_embeddings_checks_captions_and_margins_only(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    filt = CLIPScoreFilter(ClipFilterConfig(model=ModelSpec(tiny=True), min_caption_score=0.5), _WordScorer())
    good = PairInput(0, 0, PAIR, tmp_path / "red.png", tmp_path / "blue.png")
    swapped = PairInput(0, 1, PAIR, tmp_path / "blue.png", tmp_path / "red.png")
    scores = filt.score([good, swapped])
    assert scores[0] == {"reference_caption": 1.0, "target_caption": 1.0, "caption_margin": 1.0}
    assert filt.passes(scores[0]) and not filt.passes(scores[1])
    assert isinstance(CLIPScoreFilter(ClipFilterConfig(model=ModelSpec(tiny=True))).backend, CLIPScorerBackend)


def test_filter_stage_rejects_broken_renders_and_a_broken_source_drops_its_group(tmp_path):
    out = copy_dataset(baseline_dataset(), tmp_path / "run")
    config = tiny_config()
    # group 1: one edit panel truncated (that member only); group 2: the source blank (every member)
    for index, panel, damage in ((1, 2, "truncate"), (2, 0, "blank")):
        record = read_json(item_path(out / "render" / "items", index, config.shard_size))
        path = out / record["panels"][panel]
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[:40])
        else:
            Image.new("RGB", Image.open(path).size, "black").save(path)
        item_path(out / "filter" / "scores", index, config.shard_size).unlink()  # forget its scores
    reports = run_tiny(out, config, stages=("filter", "assemble"))
    assert reports["failed"] == {}
    check = ImageCheck(config.filter.image_check)
    members = load_scores(out, 1, config.shard_size)
    assert [check.passes(m["image_check"]) for m in members] == [True, False, True]
    assert "clip" not in members[1] and "judge" not in members[1]  # the cascade stopped at the image check
    assert not any(check.passes(m["image_check"]) for m in load_scores(out, 2, config.shard_size))
    triplets = read_jsonl(out / "triplets.jsonl")
    assert not {t["group"] for t in triplets} & {2}
    assert not [t for t in triplets if t["group"] == 1 and "_p2.png" in t["reference"] + t["target"]]
    assert reports["filter"]["groups"]["dropped"] >= 1
    base = reports["filter"]["filters"]["image_check"]
    assert base["evaluated"] - base["passed"] == 1 + 3


def test_new_thresholds_apply_without_rescoring(tmp_path, monkeypatch):
    out = copy_dataset(baseline_dataset(), tmp_path / "run")

    def no_models(self, device):
        raise AssertionError("the filters must not be reloaded to apply a new threshold")

    for cls in (CLIPScorerBackend, MLLMJudgeBackend):
        monkeypatch.setattr(cls, "setup", no_models)
    config = tiny_config("--filter.clip.min_direction", "0.0")
    reports = run_tiny(out, config, stages=("filter", "assemble"))
    before = read_json(baseline_dataset() / "filter" / "report.json")
    assert reports["filter"]["members"]["kept"] < before["members"]["kept"]  # stricter direction threshold
    assert reports["filter"]["filters"]["clip"]["pass_rate"] < before["filters"]["clip"]["pass_rate"]
    triplets = read_jsonl(out / "triplets.jsonl")
    assert len({t["group"] for t in triplets}) == reports["filter"]["groups"]["kept"]
    # the images of members no longer kept leave the dataset folder: the kept edits and their groups' sources
    kept_panels = {t[k] for t in triplets for k in ("reference", "target")}
    assert len([k for k in dataset_fingerprint(out) if k.startswith("images/")]) == len(kept_panels)
    assert reports["filter"]["members"]["kept"] == len(kept_panels) - reports["filter"]["groups"]["kept"]
