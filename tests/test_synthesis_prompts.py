"""Prompts stage: parsing of good and broken LLM answers, near-duplicates, seeded drawing, retries and failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_synthesis import tiny_config

from coalign.io import read_json
from coalign.synthesis import QuadrupleError, RunContext, parse_quadruple
from coalign.synthesis._io import derive_seed, item_path, list_failures
from coalign.synthesis.config import PromptsConfig, Taxonomy
from coalign.synthesis.llm import ChatLLM
from coalign.synthesis.prompts import PromptsStage, finalize_prompts
from coalign.synthesis.quadruples import conversation, draw, near_duplicates
from coalign.synthesis.runner import run_stage

CFG = PromptsConfig(min_caption_words=3, max_caption_words=12, min_text_words=2, max_text_words=6)
GOOD = {
    "reference_caption": "a red bicycle leaning on a brick wall",
    "target_caption": "a blue bicycle leaning on a brick wall",
    "forward": "make the bicycle blue",
    "backward": "make the bicycle red",
}


@pytest.mark.parametrize(
    "answer",
    [
        json.dumps(GOOD),
        "Sure! Here it is:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope it helps.",
        json.dumps({**GOOD, "note": "extra keys are dropped", "forward": "  make the   bicycle blue "}),
    ],
)
def test_parse_accepts_good_answers(answer):
    assert parse_quadruple(answer, CFG) == GOOD


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I cannot help with that.", "no JSON object"),
        ('{"reference_caption": "a red bicycle leaning', "invalid JSON"),
        ("[1, 2, 3] {", "invalid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "backward"}), "missing keys ['backward']"),
        (json.dumps({**GOOD, "forward": ["make", "it", "blue"]}), "forward is a list"),
        (json.dumps({**GOOD, "reference_caption": "bike"}), "reference_caption has 1 words"),
        (json.dumps({**GOOD, "forward": "make " * 20}), "forward has 20 words"),
        (json.dumps({**GOOD, "target_caption": GOOD["reference_caption"].upper() + "."}), "captions are identical"),
        (json.dumps({**GOOD, "backward": GOOD["forward"]}), "forward and backward texts are identical"),
    ],
)
def test_parse_rejects_broken_answers_with_a_reason(answer, reason):
    with pytest.raises(QuadrupleError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_quadruple(answer, CFG)


def test_near_duplicates_keep_the_earliest_and_spare_distinct_quadruples():
    other = {
        **GOOD,
        "reference_caption": "two dogs running on a snowy beach at sunset",
        "target_caption": "three dogs running on a snowy beach at sunset",
    }
    near = {**GOOD, "reference_caption": GOOD["reference_caption"] + " today"}
    quads = [GOOD, other, near, dict(GOOD), other]
    # one extra word: 10 shared bigrams out of 13 (Jaccard 0.77)
    assert near_duplicates(quads, threshold=0.75) == {2: 0, 3: 0, 4: 1}
    assert near_duplicates(quads, threshold=0.8) == {3: 0, 4: 1}
    assert near_duplicates([GOOD, other], threshold=0.5) == {}


def test_draw_is_seeded_per_item_and_covers_the_taxonomy():
    tax = Taxonomy()
    draws = [draw(tax, seed=0, index=i) for i in range(200)]
    assert draws == [draw(tax, seed=0, index=i) for i in range(200)]
    assert draws != [draw(tax, seed=1, index=i) for i in range(200)]
    assert {d.edit_type for d in draws} == set(tax.edit_types)
    assert len({d.domain for d in draws}) == len(tax.domains)
    user = conversation(draws[0], CFG)[1]["content"]
    assert draws[0].domain in user and tax.edit_types[draws[0].edit_type] in user and "3-12 words" in user


def _run_prompts(out: Path, *overrides: str) -> tuple[dict, dict]:
    config = tiny_config("--prompts.num_quadruples", "6", *overrides)
    run_stage(PromptsStage(config, RunContext(out=out, progress=False)))
    return config, finalize_prompts(config, out)


def test_constrained_tiny_llm_answers_parse_and_do_not_depend_on_the_batch(tmp_path):
    _, report = _run_prompts(tmp_path / "a", "--prompts.batch_size", "6")
    assert report["ok"] == 6 and report["malformed"] == 0
    _run_prompts(tmp_path / "b", "--prompts.batch_size", "4")
    a = (tmp_path / "a" / "prompts" / "quadruples.jsonl").read_text()
    assert a == (tmp_path / "b" / "prompts" / "quadruples.jsonl").read_text()  # per-item seeds, not per batch


def test_garbage_answers_are_retried_then_counted_and_skipped(tmp_path):
    # unconstrained, a random LLM writes garbage: every item uses its 1 + max_retries samples, then is skipped
    config, report = _run_prompts(tmp_path, "--prompts.constrained", "false", "--prompts.max_retries", "1")
    assert report["malformed"] == 6 and report["ok"] == 0 and report["kept"] == 0
    record = read_json(item_path(tmp_path / "prompts" / "items", 0, config.shard_size))
    assert record["status"] == "malformed" and record["attempts"] == 2 and len(record["errors"]) == 2
    assert (tmp_path / "prompts" / "quadruples.jsonl").read_text() == ""


def test_a_failing_model_call_is_recorded_and_retried_on_the_next_run(tmp_path, monkeypatch):
    real = ChatLLM.generate

    def flaky(self, conversations, seeds):
        if flaky.bad in seeds:  # the first sample of item 3 crashes the model, whatever its batch
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, conversations, seeds)

    config = tiny_config("--prompts.num_quadruples", "6")
    flaky.bad = derive_seed(config.seed, "prompts", 3, 0)
    monkeypatch.setattr(ChatLLM, "generate", flaky)
    summary = run_stage(PromptsStage(config, RunContext(out=tmp_path, progress=False)))
    assert summary.failed == [3] and summary.processed == 5
    assert [f["id"] for f in list_failures(tmp_path, "prompts")] == ["q00000003"]
    assert finalize_prompts(config, tmp_path)["failed"] == 1
    monkeypatch.setattr(ChatLLM, "generate", real)
    summary = run_stage(PromptsStage(config, RunContext(out=tmp_path, progress=False)))
    assert summary.processed == 1 and summary.done_before == 5 and not summary.failed
    assert list(list_failures(tmp_path, "prompts")) == []
    assert finalize_prompts(config, tmp_path)["kept"] == 6
