"""Synthesis throughput: each stage through the pipeline's runner against the same models in a bare loop.

Results in PERFORMANCE.md, section "Synthesis". With the tiny models of ``configs/synthesis/tiny.yaml`` on the
CPU, per stage:

* **orchestrated**: ``run_stage`` on a fresh folder (rank/shard bookkeeping, skip checks, reading the previous
  stage's artifacts, atomic JSON/PNG writes, failure isolation, progress bar), minus model loading and release;
* **bare**: the same backend calls on the same batches (the chat backend's ``generate``, the render backend's
  ``render``, the filters' ``score``), results kept in memory, nothing written.

Items are groups (``group_size`` panels each; the filters score ``group_size - 1`` member pairs per group).

Both run alternately ``--repeats`` times in one process; the median of each is reported. Budget: the runner
adds at most 10%. ``shard_size`` is raised to 1000 (as in a real config): tiny.yaml's shards of 4 exist to
exercise sharding in tests, and batches never cross a shard.

Usage::

    OMP_NUM_THREADS=1 python perf/synthesis.py [--items 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from coalign.io import read_json
from coalign.synthesis import RunContext, load_config
from coalign.synthesis._io import derive_seed, item_path
from coalign.synthesis.assemble import assemble
from coalign.synthesis.filter import FilterStage, build_filters, member_pairs
from coalign.synthesis.groups import conversation, draw, group_captions
from coalign.synthesis.prompts import PromptsStage, finalize_prompts, load_groups
from coalign.synthesis.render import RenderStage, panel_seeds
from coalign.synthesis.runner import run_stage

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prompts", "render", "filter")


def orchestrated(stage) -> float:
    """Seconds of ``run_stage`` without model loading/release (the bare loop does not time those either)."""
    lifecycle = 0.0
    for name in ("setup", "teardown"):
        original = getattr(stage, name)

        def timed(original=original):
            nonlocal lifecycle
            start = time.perf_counter()
            original()
            lifecycle += time.perf_counter() - start

        setattr(stage, name, timed)
    start = time.perf_counter()
    run_stage(stage)
    return time.perf_counter() - start - lifecycle


def batches(items: list, size: int) -> list[list]:
    return [items[s : s + size] for s in range(0, len(items), size)]


def bare_prompts(stage: PromptsStage) -> float:
    stage.setup()
    cfg = stage.config
    n = cfg.num_groups
    convs = [conversation(draw(cfg.taxonomy, stage.seed, i), cfg) for i in range(n)]
    start = time.perf_counter()
    for block in batches(list(range(n)), cfg.batch_size):
        seeds = [derive_seed(stage.seed, "prompts", i, 0) for i in block]
        stage.backend.generate([convs[i] for i in block], seeds, cfg.group_size - 1)
    elapsed = time.perf_counter() - start
    stage.teardown()
    return elapsed


def bare_render(stage: RenderStage) -> float:
    stage.setup()
    cfg, size = stage.config, stage.config.image_size
    groups = [stage.groups[i] for i in sorted(stage.groups)]
    start = time.perf_counter()
    for block in batches(groups, cfg.batch_size):
        captions = [group_captions(g) for g in block]
        seeds = [panel_seeds(stage.seed, g["index"], len(c), True)[0] for g, c in zip(block, captions, strict=True)]
        stage.backend.render(captions, seeds, size)
    elapsed = time.perf_counter() - start
    stage.teardown()
    return elapsed


def bare_filters(filters, out: Path, shard_size: int, block: int) -> float:
    """The cascade on the same blocks, every pair kept (the benchmark's thresholds keep all), nothing written."""
    groups = load_groups(out)
    records = {g["index"]: read_json(item_path(out / "render" / "items", g["index"], shard_size)) for g in groups}
    for f in filters:
        f.setup(torch.device("cpu"))
    start = time.perf_counter()
    for chunk in batches(groups, block):
        pairs = [p for g in chunk for p in member_pairs(g, records[g["index"]], out)]
        for f in filters:
            for sub in batches(pairs, f.batch_size):
                f.score(sub)
    elapsed = time.perf_counter() - start
    for f in filters:
        f.teardown()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=48, help="groups per stage")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # the filters keep every pair so that each filter sees all items, in both modes
    config = load_config(
        ROOT / "configs" / "synthesis" / "tiny.yaml",
        [
            "--shard_size",
            "1000",
            "--prompts.num_groups",
            str(args.items),
            "--filter.clip.min_direction",
            "-1",
            "--filter.judge.min_yes_probability",
            "0",
        ],
    )
    work = Path(tempfile.mkdtemp(prefix="coalign-bench-synth-"))
    base = work / "base"
    ctx = RunContext(out=base, progress=False)
    times: dict[str, dict[str, list[float]]] = {
        s: {"bare": [], "orchestrated": []} for s in ("prompts", "render", "filter")
    }
    try:
        # first pass builds the inputs of the next stage (and warms every kernel up); it is not timed
        run_stage(PromptsStage(config, ctx))
        finalize_prompts(config, base)
        run_stage(RenderStage(config, ctx))
        run_stage(FilterStage(config, ctx, build_filters(config.filter)))
        for r in range(args.repeats):
            fresh = work / f"run{r}"
            shutil.copytree(base / "prompts", fresh / "prompts")
            shutil.copytree(base / "render", fresh / "render")  # the filter pass reads these renders
            fctx = RunContext(out=fresh, progress=False)
            for name in ("prompts", "render"):
                shutil.rmtree(fresh / name / "items")
                cls = PromptsStage if name == "prompts" else RenderStage
                bare = bare_prompts if name == "prompts" else bare_render
                for mode in ("orchestrated", "bare") if r % 2 == 0 else ("bare", "orchestrated"):
                    stage = cls(config, fctx)
                    times[name][mode].append(orchestrated(stage) if mode == "orchestrated" else bare(stage))
            for mode in ("orchestrated", "bare") if r % 2 == 0 else ("bare", "orchestrated"):
                filters = build_filters(config.filter)
                if mode == "bare":
                    bare = bare_filters(filters, fresh, config.shard_size, config.filter.batch_size)
                    times["filter"]["bare"].append(bare)
                else:
                    times["filter"]["orchestrated"].append(orchestrated(FilterStage(config, fctx, filters)))
        start = time.perf_counter()
        assemble(config, work / "run0", build_filters(config.filter))
        assemble_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for name, t in times.items():
        bare, orch = statistics.median(t["bare"]), statistics.median(t["orchestrated"])
        rows[name] = {
            "bare_items_per_s": round(args.items / bare, 1),
            "orchestrated_items_per_s": round(args.items / orch, 1),
            "overhead_pct": round(100 * (orch / bare - 1), 1),
        }
    rows["assemble"] = {"orchestrated_items_per_s": round(args.items / assemble_s, 1)}
    print(f"{'stage':10s} {'bare it/s':>10s} {'runner it/s':>12s} {'overhead':>9s}")
    for name, r in rows.items():
        bare = f"{r['bare_items_per_s']:10.1f}" if name in STAGES else f"{'-':>10s}"
        overhead = f"{r['overhead_pct']:8.1f}%" if name in STAGES else f"{'-':>9s}"
        print(f"{name:10s} {bare} {r['orchestrated_items_per_s']:12.1f} {overhead}")
    print(json.dumps({"items": args.items, "repeats": args.repeats, "stages": rows}))


if __name__ == "__main__":
    main()
