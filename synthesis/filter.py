"""Stage 3, filter: pluggable filters score every rendered pair; thresholds turn scores into decisions.

Filters run as a cascade, cheapest first: the image check (always on), the CLIP-score filter, the
multimodal-LLM judge. Within a block of pairs, each filter scores only the pairs that passed all the previous
ones, so the expensive judge never sees a blank render. All filter models stay loaded during the stage (a
CLIP-L and a 7B judge fit one GPU together), so each pair's images are decoded once and its scores are written
once, to ``OUT/filter/scores/<shard>/<id>.json``: ``{"id", "scores": {<filter name>: {...}, ...}}``; a filter
that did not see the pair (rejected earlier) has no entry.

Scores and decisions are kept apart: the decision is recomputed from the stored scores with the current
thresholds wherever it is needed (:func:`decide`). Changing a threshold, or adding a filter, costs a rerun of
``--stage filter`` that scores only the pairs now reaching a filter that has not seen them, then
``--stage assemble``. ``OUT/filter/report.json`` gives, per filter, how many pairs it evaluated and passed.

A new filter is a :class:`.pair_filter.PairFilter` subclass passed to ``pipeline.run(..., filters=[...])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coalign.io import atomic_write_json, read_json

from ._io import existing_items, item_path, list_failures
from .clip_filter import CLIPScoreFilter
from .config import FilterConfig, SynthesisConfig
from .judge import MLLMJudgeFilter
from .pair_filter import ImageCheck, PairFilter, PairInput
from .prompts import load_quadruples
from .runner import RunContext, Stage

__all__ = ["PairInput", "PairFilter", "ImageCheck", "FilterStage", "build_filters", "decide", "filter_report"]


def build_filters(config: FilterConfig) -> list[PairFilter]:
    """The configured filters, cheapest first."""
    filters: list[PairFilter] = [ImageCheck(config.image_check)]
    if config.clip is not None:
        filters.append(CLIPScoreFilter(config.clip))
    if config.judge is not None:
        filters.append(MLLMJudgeFilter(config.judge))
    return filters


def _score_path(out: Path, index: int, shard_size: int) -> Path:
    return item_path(out / "filter" / "scores", index, shard_size)


def decide(filters: Sequence[PairFilter], scores: dict[str, Any]) -> tuple[str, str | None]:
    """``("kept", None)``, ``("rejected", filter)`` or ``("pending", filter)`` from one pair's stored scores."""
    for f in filters:
        if f.name not in scores:
            return "pending", f.name
        if not f.passes(scores[f.name]):
            return "rejected", f.name
    return "kept", None


def load_scores(out: Path, index: int, shard_size: int) -> dict[str, Any]:
    """The stored scores of a pair, ``{}`` when it has none yet."""
    path = _score_path(out, index, shard_size)
    return read_json(path)["scores"] if path.is_file() else {}


class FilterStage(Stage):
    """Runs the filter cascade over the rendered pairs; see the module docstring.

    Args:
        config: the synthesis config.
        ctx: this rank's context.
        filters: the filters, cheapest first.
    """

    name = "filter"

    def __init__(self, config: SynthesisConfig, ctx: RunContext, filters: Sequence[PairFilter]):
        super().__init__(ctx, config.shard_size)
        self.filters = list(filters)
        self.batch_size = config.filter.batch_size
        self.quads = {q["index"]: q for q in load_quadruples(ctx.out)}
        self._stored: dict[int, dict[str, Any]] = {}  # scores of this rank's pairs already on disk

    def items(self) -> list[int]:
        return sorted(self.quads)

    def wanted(self, index: int) -> bool:
        return index in self._rendered

    def done_items(self, indices: Sequence[int]) -> set[int]:
        # one listing per shard; only the pairs that have a score file are read (is any filter missing?)
        with_scores = existing_items(self.ctx.out / "filter" / "scores", indices, self.shard_size)
        self._stored = {i: load_scores(self.ctx.out, i, self.shard_size) for i in with_scores}
        return {i for i in with_scores if decide(self.filters, self._stored[i])[0] != "pending"}

    def is_done(self, index: int) -> bool:
        return decide(self.filters, load_scores(self.ctx.out, index, self.shard_size))[0] != "pending"

    @property
    def _rendered(self) -> set[int]:
        if not hasattr(self, "_rendered_cache"):
            mine = [i for i in self.quads if self.ctx.owns(i, self.shard_size)]
            self._rendered_cache = existing_items(self.ctx.out / "render" / "items", mine, self.shard_size)
        return self._rendered_cache

    def setup(self) -> None:
        for f in self.filters:
            f.setup(self.ctx.device)

    def teardown(self) -> None:
        for f in self.filters:
            f.teardown()

    def process(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        pairs = {}
        for i in indices:
            record = read_json(item_path(self.ctx.out / "render" / "items", i, self.shard_size))
            pairs[i] = PairInput(i, self.quads[i], self.ctx.out / record["reference"], self.ctx.out / record["target"])
        scores = {i: dict(self._stored.get(i, {})) for i in indices}
        active = list(indices)
        for f in self.filters:
            todo = [i for i in active if f.name not in scores[i]]
            for start in range(0, len(todo), f.batch_size):
                chunk = todo[start : start + f.batch_size]
                for i, s in zip(chunk, f.score([pairs[i] for i in chunk]), strict=True):
                    scores[i][f.name] = s
            active = [i for i in active if f.passes(scores[i][f.name])]
        return [scores[i] for i in indices]

    def write(self, index: int, result: dict[str, Any]) -> None:
        path = _score_path(self.ctx.out, index, self.shard_size)
        atomic_write_json(path, {"id": self.quads[index]["id"], "scores": result}, indent=None)


def filter_report(config: SynthesisConfig, out: Path, filters: Sequence[PairFilter]) -> dict[str, Any]:
    """Per-filter pass rates over the rendered pairs; written to ``OUT/filter/report.json``."""
    quads = load_quadruples(out)
    rendered = sorted(existing_items(out / "render" / "items", [q["index"] for q in quads], config.shard_size))
    per_filter = {f.name: {"evaluated": 0, "passed": 0} for f in filters}
    status = {"kept": 0, "rejected": 0, "pending": 0}
    for index in rendered:
        scores = load_scores(out, index, config.shard_size)
        for f in filters:  # the walk of `decide`, counting on the way
            if f.name not in scores:
                break
            per_filter[f.name]["evaluated"] += 1
            if not f.passes(scores[f.name]):
                break
            per_filter[f.name]["passed"] += 1
        status[decide(filters, scores)[0]] += 1
    for stats in per_filter.values():
        stats["pass_rate"] = round(stats["passed"] / stats["evaluated"], 4) if stats["evaluated"] else None
    report = {
        "rendered": len(rendered),
        "not_rendered": len(quads) - len(rendered),
        **status,
        "pass_rate": round(status["kept"] / len(rendered), 4) if rendered else None,
        "filters": per_filter,
        "failed": sum(1 for _ in list_failures(out, "filter")),
    }
    atomic_write_json(out / "filter" / "report.json", report)
    return report
