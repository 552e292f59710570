"""Prompts stage: parsing of good and broken group answers, near-duplicates, seeded drawing, retries, failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _tiny_synthesis import tiny_config

from coalign.io import read_json
from coalign.synthesis import GroupError, RunContext, parse_group
from coalign.synthesis._io import derive_seed, item_path, list_failures
from coalign.synthesis.config import PromptsConfig, Taxonomy
from coalign.synthesis.groups import conversation, draw, group_pieces, near_duplicates
from coalign.synthesis.hf_backends import HFChatBackend
from coalign.synthesis.prompts import PromptsStage, finalize_prompts
from coalign.synthesis.runner import run_stage

CFG = PromptsConfig(group_size=3, min_caption_words=3, max_caption_words=12, min_text_words=2, max_text_words=6)
GOOD = {
    "source": "a red bicycle leaning on a brick wall",
    "edits": [
        {"caption": "a blue bicycle leaning on a brick wall", "forward": "make the bicycle blue",
         "backward": "make the bicycle red"},
        {"caption": "a red bicycle leaning on a wooden fence", "forward": "replace the wall with a fence",
         "backward": "replace the fence with a wall"},
    ],
    "cross": [{"from": 0, "to": 1, "text": "make it red by a fence"}],
}  # fmt: skip


def _with(path: str, value) -> str:
    """GOOD as JSON with one field (``edits.1.caption``, ``cross``, ...) replaced, or removed when value is ...."""
    obj = json.loads(json.dumps(GOOD))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = obj
    for p in parents:
        target = target[p]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return json.dumps(obj)


@pytest.mark.parametrize(
    "answer",
    [
        json.dumps(GOOD),
        "Sure! Here it is:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope it helps.",
        _with("note", "extra keys are dropped"),
        _with("edits.0.forward", "  make the \t\u0007bicycle\u200b blue "),  # control characters removed
    ],
)
def test_parse_accepts_good_answers(answer):
    assert parse_group(answer, CFG) == GOOD


def test_parse_accepts_a_group_without_cross_texts():
    assert parse_group(_with("cross", ...), CFG) == {**GOOD, "cross": []}
    assert parse_group(_with("cross", []), CFG)["cross"] == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I cannot help with that.", "no JSON object"),
        ('{"source": "a red bicycle leaning', "invalid JSON"),
        ("[1, 2, 3] {", "invalid JSON"),
        ('{"source": "a b c d", "source": "e f g h", "edits": []}', "duplicate keys ['source']"),
        (json.dumps({"edits": GOOD["edits"]}), "misses keys ['source']"),
        (_with("edits", GOOD["edits"][:1]), "edits must be a list of 2 objects, got 1"),
        (_with("edits", "none"), "edits must be a list of 2 objects, got str"),
        (_with("edits.1", "a caption"), "edits[1] is a str"),
        (_with("edits.1.backward", ...), "edits[1] misses keys ['backward']"),
        (_with("edits.0.forward", ["make", "it", "blue"]), "edits[0].forward is a list"),
        (_with("source", "bike"), "source has 1 words"),
        (_with("source", " \u0000\n "), "source is empty"),
        (_with("edits.1.forward", "make " * 20), "edits[1].forward has 20 words"),
        (_with("edits.1.caption", GOOD["source"].upper() + "."), "two captions of the group are identical"),
        (_with("edits.1.caption", GOOD["edits"][0]["caption"]), "two captions of the group are identical"),
        (_with("edits.0.backward", "Make the bicycle blue!"), "edits[0].forward and backward texts are identical"),
        (_with("cross", {"from": 0}), "cross is a dict"),
        (_with("cross.0.to", 0), "cross[0] needs two different edit positions"),
        (_with("cross.0.to", 2), "cross[0] needs two different edit positions"),
        (_with("cross.0.to", True), "cross[0] needs two different edit positions"),
        (_with("cross", GOOD["cross"] * 2), "cross[1] repeats 0 -> 1"),
        (_with("cross.0.text", "go"), "cross[0].text has 1 words"),
    ],
)
def test_parse_rejects_broken_answers_with_a_reason(answer, reason):
    with pytest.raises(GroupError, match=re.escape(reason)):
        parse_group(answer, CFG)


@pytest.mark.parametrize(("num_edits", "cross"), [(1, True), (3, True), (3, False)])
def test_constrained_pieces_spell_a_group_the_parser_accepts(num_edits, cross):
    pieces, kinds = group_pieces(num_edits, cross)
    words = {"caption": ["w{n} caption words here"], "text": ["t{n} text here"]}
    fields = [words[k][0].format(n=n) for n, k in enumerate(kinds)]
    answer = "".join(p + f for p, f in zip(pieces, fields + [""], strict=True))
    group = parse_group(answer, PromptsConfig(group_size=num_edits + 1, min_caption_words=3, min_text_words=2))
    assert len(group["edits"]) == num_edits
    assert [(c["from"], c["to"]) for c in group["cross"]] == (
        [(i, i + 1) for i in range(num_edits - 1)] if cross else []
    )


def test_near_duplicates_keep_the_earliest_and_spare_distinct_groups():
    other = {**GOOD, "source": "two dogs running on a snowy beach at sunset"}
    near = {
        **GOOD,
        "edits": [{**GOOD["edits"][0], "caption": GOOD["edits"][0]["caption"] + " today"}, GOOD["edits"][1]],
    }
    groups = [GOOD, other, near, dict(GOOD), other]
    # one extra word in one caption: 13 shared bigrams out of 15 (Jaccard 0.87)
    assert near_duplicates(groups, threshold=0.85) == {2: 0, 3: 0, 4: 1}
    assert near_duplicates(groups, threshold=0.9) == {3: 0, 4: 1}
    assert near_duplicates([GOOD, {**GOOD, "source": "a cat", "edits": [{"caption": "a dog"}] * 2}], 0.5) == {}


def test_draw_is_seeded_per_item_and_covers_the_taxonomy():
    tax = Taxonomy()
    draws = [draw(tax, seed=0, index=i) for i in range(200)]
    assert draws == [draw(tax, seed=0, index=i) for i in range(200)]
    assert draws != [draw(tax, seed=1, index=i) for i in range(200)]
    assert {d.edit_type for d in draws} == set(tax.edit_types)
    assert len({d.domain for d in draws}) == len(tax.domains)
    user = conversation(draws[0], CFG)[1]["content"]
    assert draws[0].domain in user and tax.edit_types[draws[0].edit_type] in user and "3-12 words" in user
    assert "exactly 2 objects" in user and '"cross"' in user


def _run_prompts(out: Path, *overrides: str) -> tuple[dict, dict]:
    config = tiny_config("--prompts.num_groups", "6", *overrides)
    run_stage(PromptsStage(config, RunContext(out=out, progress=False)))
    return config, finalize_prompts(config, out)


def test_constrained_tiny_llm_answers_parse_and_do_not_depend_on_the_batch(tmp_path):
    _, report = _run_prompts(tmp_path / "a", "--prompts.batch_size", "6")
    assert report["ok"] == 6 and report["malformed"] == 0
    _run_prompts(tmp_path / "b", "--prompts.batch_size", "4")
    a = (tmp_path / "a" / "prompts" / "groups.jsonl").read_text()
    assert a == (tmp_path / "b" / "prompts" / "groups.jsonl").read_text()  # per-item seeds, not per batch


def test_garbage_answers_are_retried_then_counted_and_skipped(tmp_path):
    # unconstrained, a random LLM writes garbage: every item uses its 1 + max_retries samples, then is skipped
    config, report = _run_prompts(tmp_path, "--prompts.constrained", "false", "--prompts.max_retries", "1")
    assert report["malformed"] == 6 and report["ok"] == 0 and report["kept"] == 0
    record = read_json(item_path(tmp_path / "prompts" / "items", 0, config.shard_size))
    assert record["status"] == "malformed" and record["attempts"] == 2 and len(record["errors"]) == 2
    assert (tmp_path / "prompts" / "groups.jsonl").read_text() == ""


def test_a_failing_model_call_is_recorded_and_retried_on_the_next_run(tmp_path, monkeypatch):
    real = HFChatBackend.generate

    def flaky(self, conversations, seeds, num_edits):
        if flaky.bad in seeds:  # the first sample of item 3 crashes the model, whatever its batch
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, conversations, seeds, num_edits)

    config = tiny_config("--prompts.num_groups", "6")
    flaky.bad = derive_seed(config.seed, "prompts", 3, 0)
    monkeypatch.setattr(HFChatBackend, "generate", flaky)
    summary = run_stage(PromptsStage(config, RunContext(out=tmp_path, progress=False)))
    assert summary.failed == [3] and summary.processed == 5
    assert [f["id"] for f in list_failures(tmp_path, "prompts")] == ["q00000003"]
    assert finalize_prompts(config, tmp_path)["failed"] == 1
    monkeypatch.setattr(HFChatBackend, "generate", real)
    summary = run_stage(PromptsStage(config, RunContext(out=tmp_path, progress=False)))
    assert summary.processed == 1 and summary.done_before == 5 and not summary.failed
    assert list(list_failures(tmp_path, "prompts")) == []
    assert finalize_prompts(config, tmp_path)["kept"] == 6
