"""Stage 3, filter: pluggable filters score every member pair of a group; thresholds turn scores into decisions.

A group of ``n`` panels has ``n - 1`` member pairs: (source panel, edit ``k`` panel) with the source and edit
captions and the forward/backward texts (:class:`.pair_filter.PairInput`). Filters run as a cascade, cheapest
first: the image check (always on), the CLIP-score filter, the judge. Within a block of groups, each filter
scores only the member pairs that passed all the previous ones, so the expensive judge never sees a blank render.
All filter models stay loaded during the stage, and a group's scores are written once, to
``OUT/filter/scores/<shard>/<id>.json``: ``{"id", "members": [{<filter name>: {...}, ...}, ...]}`` (one entry per
edit, in order); a filter that did not see a pair (rejected earlier) has no entry in it.

Decisions are per member (:func:`decide`): a group keeps its passing members; one whose source panel fails (it is
in every pair, so the image check or the caption score rejects them all) loses all its members, and a group with
no passing member is dropped. Both are counted in ``OUT/filter/report.json``, never dropped silently.

Scores and decisions are kept apart: the decision is recomputed from the stored scores with the current
thresholds wherever it is needed (:func:`decide`). Changing a threshold, or adding a filter, costs a rerun of
``--stage filter`` that scores only the pairs now reaching a filter that has not seen them, then
``--stage assemble``. ``OUT/filter/report.json`` gives, per filter, how many pairs it evaluated and passed, and
how many groups and members are kept, rejected (dropped) or pending.

A new filter is a :class:`.pair_filter.PairFilter` subclass passed to ``pipeline.run(..., filters=[...])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coalign.io import atomic_write_json, read_json

from ._io import existing_items, item_path, list_failures
from .config import FilterConfig, SynthesisConfig
from .model_filters import CLIPScoreFilter, JudgeFilter
from .pair_filter import ImageCheck, PairFilter, PairInput
from .prompts import load_groups
from .runner import RunContext, Stage

__all__ = [
    "PairInput",
    "PairFilter",
    "ImageCheck",
    "FilterStage",
    "build_filters",
    "decide",
    "group_status",
    "load_scores",
    "member_pairs",
    "filter_report",
]


def build_filters(config: FilterConfig) -> list[PairFilter]:
    """The configured filters, cheapest first."""
    filters: list[PairFilter] = [ImageCheck(config.image_check)]
    if config.clip is not None:
        filters.append(CLIPScoreFilter(config.clip))
    if config.judge is not None:
        filters.append(JudgeFilter(config.judge))
    return filters


def _score_path(out: Path, index: int, shard_size: int) -> Path:
    return item_path(out / "filter" / "scores", index, shard_size)


def decide(filters: Sequence[PairFilter], scores: dict[str, Any]) -> tuple[str, str | None]:
    """``("kept", None)``, ``("rejected", filter)`` or ``("pending", filter)`` from one member pair's scores."""
    for f in filters:
        if f.name not in scores:
            return "pending", f.name
        if not f.passes(scores[f.name]):
            return "rejected", f.name
    return "kept", None


def group_status(filters: Sequence[PairFilter], members: Sequence[dict[str, Any]]) -> str:
    """``pending`` (some member not fully scored), ``kept`` (at least one member kept) or ``dropped``."""
    decisions = [decide(filters, m)[0] for m in members]
    if not decisions or "pending" in decisions:
        return "pending"
    return "kept" if "kept" in decisions else "dropped"


def load_scores(out: Path, index: int, shard_size: int) -> list[dict[str, Any]]:
    """The stored per-member scores of a group, ``[]`` when it has none yet."""
    path = _score_path(out, index, shard_size)
    return read_json(path)["members"] if path.is_file() else []


def member_pairs(group: dict[str, Any], record: dict[str, Any], out: Path) -> list[PairInput]:
    """The (source, edit) pairs of a rendered group, in edit order (``record``: its render record)."""
    source = out / record["panels"][0]
    return [
        PairInput(
            group["index"],
            k,
            {
                "reference_caption": group["source"],
                "target_caption": edit["caption"],
                "forward": edit["forward"],
                "backward": edit["backward"],
            },
            source,
            out / record["panels"][k + 1],
        )
        for k, edit in enumerate(group["edits"])
    ]


class FilterStage(Stage):
    """Runs the filter cascade over the member pairs of the rendered groups; see the module docstring.

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
        self.groups = {g["index"]: g for g in load_groups(ctx.out)}
        self._stored: dict[int, list[dict[str, Any]]] = {}  # scores of this rank's groups already on disk

    def items(self) -> list[int]:
        return sorted(self.groups)

    def wanted(self, index: int) -> bool:
        return index in self._rendered

    def done_items(self, indices: Sequence[int]) -> set[int]:
        # one listing per shard; only the groups that have a score file are read (is any filter missing?)
        with_scores = existing_items(self.ctx.out / "filter" / "scores", indices, self.shard_size)
        self._stored = {i: load_scores(self.ctx.out, i, self.shard_size) for i in with_scores}
        return {i for i in with_scores if group_status(self.filters, self._stored[i]) != "pending"}

    def is_done(self, index: int) -> bool:
        return group_status(self.filters, load_scores(self.ctx.out, index, self.shard_size)) != "pending"

    @property
    def _rendered(self) -> set[int]:
        if not hasattr(self, "_rendered_cache"):
            mine = [i for i in self.groups if self.ctx.owns(i, self.shard_size)]
            self._rendered_cache = existing_items(self.ctx.out / "render" / "items", mine, self.shard_size)
        return self._rendered_cache

    def setup(self) -> None:
        for f in self.filters:
            f.setup(self.ctx.device)

    def teardown(self) -> None:
        for f in self.filters:
            f.teardown()

    def process(self, indices: Sequence[int]) -> list[list[dict[str, Any]]]:
        pairs: list[PairInput] = []
        for i in indices:
            record = read_json(item_path(self.ctx.out / "render" / "items", i, self.shard_size))
            pairs.extend(member_pairs(self.groups[i], record, self.ctx.out))
        stored = {i: self._stored.get(i, []) for i in indices}
        scores = {
            (p.index, p.member): dict(stored[p.index][p.member]) if p.member < len(stored[p.index]) else {}
            for p in pairs
        }
        active = list(pairs)
        for f in self.filters:
            todo = [p for p in active if f.name not in scores[p.index, p.member]]
            for start in range(0, len(todo), f.batch_size):
                chunk = todo[start : start + f.batch_size]
                result = f.score(chunk)
                if len(result) != len(chunk):
                    raise RuntimeError(f"filter {f.name} scored {len(result)} of {len(chunk)} pairs")
                for p, s in zip(chunk, result, strict=True):
                    scores[p.index, p.member][f.name] = s
            active = [p for p in active if f.passes(scores[p.index, p.member][f.name])]
        return [[scores[i, k] for k in range(len(self.groups[i]["edits"]))] for i in indices]

    def write(self, index: int, result: list[dict[str, Any]]) -> None:
        path = _score_path(self.ctx.out, index, self.shard_size)
        atomic_write_json(path, {"id": self.groups[index]["id"], "members": result}, indent=None)


def filter_report(config: SynthesisConfig, out: Path, filters: Sequence[PairFilter]) -> dict[str, Any]:
    """Per-filter pass rates over the member pairs, group and member decisions; ``OUT/filter/report.json``."""
    groups = load_groups(out)
    rendered = sorted(existing_items(out / "render" / "items", [g["index"] for g in groups], config.shard_size))
    per_filter = {f.name: {"evaluated": 0, "passed": 0} for f in filters}
    members = {"kept": 0, "rejected": 0, "pending": 0}
    status = {"kept": 0, "dropped": 0, "pending": 0}
    for index in rendered:
        scores = load_scores(out, index, config.shard_size)
        for member in scores:
            for f in filters:  # the walk of `decide`, counting on the way
                if f.name not in member:
                    break
                per_filter[f.name]["evaluated"] += 1
                if not f.passes(member[f.name]):
                    break
                per_filter[f.name]["passed"] += 1
            members[decide(filters, member)[0]] += 1
        status[group_status(filters, scores)] += 1
    for stats in per_filter.values():
        stats["pass_rate"] = round(stats["passed"] / stats["evaluated"], 4) if stats["evaluated"] else None
    scored = members["kept"] + members["rejected"]
    report = {
        "rendered": len(rendered),
        "not_rendered": len(groups) - len(rendered),
        "groups": status,
        "members": members,
        "pass_rate": round(members["kept"] / scored, 4) if scored else None,
        "filters": per_filter,
        "failed": sum(1 for _ in list_failures(out, "filter")),
    }
    atomic_write_json(out / "filter" / "report.json", report)
    return report
