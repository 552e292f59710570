"""Run the four stages in order on every rank, with barriers where a stage needs all ranks' outputs.

::

    prompts  (all ranks: items)  -> barrier -> rank 0: merge + dedup -> groups.jsonl -> barrier
    render   (all ranks: items)  -> barrier
    filter   (all ranks: items, through the cascade of filters) -> barrier -> rank 0: report.json -> barrier
    assemble (rank 0)            -> barrier

Every step is idempotent, so the whole command can be rerun after any interruption: finished items are skipped
and the merges are recomputed from what is on disk.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from coalign.io import atomic_write_json

from . import openai_backend  # noqa: F401  (registers OpenAIChat and OpenAIJudge: a YAML may name them by class name)
from ._io import list_failures
from .assemble import assemble
from .config import SynthesisConfig, fingerprint
from .filter import FilterStage, build_filters, filter_report
from .pair_filter import PairFilter
from .prompts import PromptsStage, finalize_prompts
from .render import RenderStage
from .runner import RunContext, StageSummary, check_settings, run_stage

__all__ = ["STAGES", "run"]

STAGES = ("prompts", "render", "filter", "assemble")
log = logging.getLogger("coalign.synthesis")


def _log(ctx: RunContext, summary: StageSummary) -> None:
    log.info(
        "rank %d %s: %d items on this rank, %d already done, %d processed, %d failed",
        ctx.rank,
        summary.name,
        summary.owned,
        summary.done_before,
        summary.processed,
        len(summary.failed),
    )


def run(
    config: SynthesisConfig,
    ctx: RunContext,
    stages: Sequence[str] = STAGES,
    filters: Sequence[PairFilter] | None = None,
) -> dict[str, Any]:
    """Run ``stages`` (in pipeline order) and return rank 0's reports (other ranks get per-stage summaries).

    Args:
        config: the synthesis configuration.
        ctx: this process's place in the run (see :func:`.runner.launch`).
        stages: a subset of :data:`STAGES`.
        filters: a custom list of :class:`.pair_filter.PairFilter` (default: built from ``config.filter``).

    Returns:
        ``{stage: report}``, plus ``"failed"``: items whose model call failed and that the next run retries.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    out, seed, shards = ctx.out, config.seed, config.shard_size
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "synthesis_config.json", dataclasses.asdict(config))
    ctx.barrier("start")
    reports: dict[str, Any] = {}

    if "prompts" in stages:
        stage = PromptsStage(config, ctx)
        settings = fingerprint(config.prompts, seed=seed, shard_size=shards, backend=stage.backend.settings())
        check_settings(out / "prompts" / "settings.json", settings, "prompts")
        _log(ctx, run_stage(stage))
        ctx.barrier("prompts")
        if ctx.is_main:
            reports["prompts"] = finalize_prompts(config, out)
        ctx.barrier("prompts-merged")

    if "render" in stages:
        stage = RenderStage(config, ctx)
        settings = fingerprint(config.render, seed=seed, shard_size=shards, backend=stage.backend.settings())
        check_settings(out / "render" / "settings.json", settings, "render")
        _log(ctx, run_stage(stage))
        ctx.barrier("render")

    if "filter" in stages or "assemble" in stages:
        filters = list(filters) if filters is not None else build_filters(config.filter)
    if "filter" in stages:
        for pair_filter in filters:  # one file per filter: adding a filter later is fine, changing one is not
            settings = {**pair_filter.settings(), "shard_size": shards}
            check_settings(
                out / "filter" / "settings" / f"{pair_filter.name}.json", settings, f"filter {pair_filter.name}"
            )
        _log(ctx, run_stage(FilterStage(config, ctx, filters)))
        ctx.barrier("filter")
        if ctx.is_main:
            reports["filter"] = filter_report(config, out, filters)
        ctx.barrier("filter-report")

    if "assemble" in stages:
        if ctx.is_main:
            reports["assemble"] = assemble(config, out, filters)
        ctx.barrier("assemble")

    failed = {}
    for stage in ("prompts", "render", "filter"):
        count = sum(1 for _ in list_failures(out, stage))
        if count:
            failed[stage] = count
    reports["failed"] = failed
    return reports
