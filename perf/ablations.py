"""The paper's claim, measured on Shapes (issue 10): zero-shot CoAlign trained on synthetic triplets only, and
what each part of the recipe adds.

Every row trains a tiny CoAlign and tests it on the Shapes benchmark's held-out test split (the quickstart's: a
gallery full of one-edit look-alikes), reporting shapes/R@1, R@5 and R@10 (mean ± std over ``--seeds``) and the
wall time of each run. Rows:

==========  ==============================================================================================
supervised  ``configs/quickstart.yaml``: trained on Shapes' own training split (the upper reference)
zeroshot    ``configs/experiments/shapes_zeroshot.yaml`` on ``coalign synthesize`` output (the recipe)
separate    zero-shot, the synthesis renders every image with its own seed instead of one composite per group
nofilter    zero-shot, the synthesis keeps every rendered pair (CLIP filter and judge off)
pairs       zero-shot, groups of one source and one edit (the plain pairs the paper improves on)
beta0       zero-shot with beta = 0: plain InfoNCE, no same-group soft positives
nolocal     zero-shot without the local contextual reasoning head
wholegroups zero-shot with every group whole in one batch (``group_size 0``) instead of chunks of 4 triplets
nocolour    zero-shot without the colour-permuted target negatives (``colour_negatives false``)
imageonly   zero-shot baseline: the query ignores the text
textonly    zero-shot baseline: the query ignores the reference image
==========  ==============================================================================================

Each run is a subprocess (``coalign synthesize`` once per synthesis variant and seed, then ``coalign fit`` with
``test_after_fit``), so a crash costs one run. Layout under ``--out`` (default ``runs/ablations``):
``data/<variant>/seed<S>/`` (synthesized triplets), ``<row>/seed<S>/`` (``metrics.json``, ``fit.log``,
``timing.json``, ``model/``), and ``results.json``. A run whose ``metrics.json`` exists is not run again and a
synthesized folder with a ``triplets.jsonl`` is reused, so an interrupted table resumes where it stopped.

Usage::

    python perf/ablations.py --dry-run                              # print the commands only
    python perf/ablations.py --rows zeroshot,beta0 --seeds 0 1 2    # some rows
    python perf/ablations.py --seeds 0 1 2                          # the whole table (about 2.5 h on 2 free cores)
    python perf/ablations.py --rows zeroshot --seeds 0 --max-steps 3 --out /tmp/abl \
        --synthesis-args "--prompts.num_groups 20" --fit-args "--data.test.init_args.num_eval_sources 20"   # smoke

Comparability: every row runs ``max_steps`` (400) unless the machine is so slow or loaded that ``max_time``
stops it first; ``timing.json`` records which (``stopped_by``) and the table flags such rows. Other jobs on the
machine change the wall times, not the step counts: say how loaded the machine was when quoting a time.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ================================================================================================================
# THE TABLE: edit here when a config or a flag changes. Synthesis flags are those of `coalign synthesize`
# (fields of coalign.synthesis.config.SynthesisConfig); fit flags are LightningCLI flags of `coalign fit`.
# ================================================================================================================
SYNTHESIS_CONFIG = "configs/synthesis/shapes.yaml"
ZEROSHOT_CONFIG = "configs/experiments/shapes_zeroshot.yaml"
SUPERVISED_CONFIG = "configs/quickstart.yaml"

#: synthesis variant -> overrides of `coalign synthesize --config SYNTHESIS_CONFIG`
SYNTHESIS_VARIANTS: dict[str, list[str]] = {
    "full": [],
    "separate": ["--render.composite", "false"],  # one seeded render per image, no shared composite
    "nofilter": ["--filter.clip", "null", "--filter.judge", "null"],  # the image check stays (always on)
    # one source + one edit per group; twice the groups of configs/synthesis/shapes.yaml (2,500 groups of 4
    # panels), so as many images are rendered as with groups of 4
    "pairs": ["--prompts.group_size", "2", "--prompts.num_groups", "5000"],
}


def _composer(name: str) -> list[str]:
    return ["--model.backbone.init_args.composer", f"coalign.backbones.{name}",
            "--model.backbone.init_args.composer.init_args.dim", "128"]  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One line of the table: a training config, the synthesized data it trains on (None: none) and overrides."""

    config: str
    variant: str | None
    fit: list[str] = field(default_factory=list)


ROWS: dict[str, Row] = {
    "supervised": Row(SUPERVISED_CONFIG, None),
    "zeroshot": Row(ZEROSHOT_CONFIG, "full"),
    "separate": Row(ZEROSHOT_CONFIG, "separate"),
    "nofilter": Row(ZEROSHOT_CONFIG, "nofilter"),
    "pairs": Row(ZEROSHOT_CONFIG, "pairs", ["--data.train.init_args.group_size", "2"]),
    "beta0": Row(
        ZEROSHOT_CONFIG,
        "full",
        ["--model.global_head.init_args.beta", "0.0", "--model.local_head.init_args.beta", "0.0"],
    ),  # fmt: skip
    "nolocal": Row(ZEROSHOT_CONFIG, "full", ["--model.local_head", "null"]),
    "wholegroups": Row(ZEROSHOT_CONFIG, "full", ["--data.train.init_args.group_size", "0"]),
    "nocolour": Row(ZEROSHOT_CONFIG, "full", ["--model.colour_negatives", "false"]),
    "imageonly": Row(ZEROSHOT_CONFIG, "full", _composer("ImageOnlyComposer")),
    "textonly": Row(ZEROSHOT_CONFIG, "full", _composer("TextOnlyComposer")),
}
METRICS = ("shapes/R@1", "shapes/R@5", "shapes/R@10")
# ================================================================================================================


def synthesis_command(variant: str, seed: int, output: Path, extra: str = "") -> list[str]:
    """`coalign synthesize` for one variant and seed (``extra``: more flags, one shell-quoted string)."""
    return ["coalign", "synthesize", "--config", SYNTHESIS_CONFIG, *SYNTHESIS_VARIANTS[variant],
            "--seed", str(seed), "--output", str(output), *shlex.split(extra)]  # fmt: skip


def fit_command(row: Row, seed: int, run_dir: Path, data_dir: Path | None, args: argparse.Namespace) -> list[str]:
    """`coalign fit` (then test) for one row and seed."""
    cmd = ["coalign", "fit", "--config", row.config, *row.fit, "--seed_everything", str(seed),
           "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if data_dir is not None:  # zero-shot: the synthesized folder, shuffled by the seed
        cmd += ["--data.train.init_args.root", str(data_dir), "--data.train.init_args.seed", str(seed)]
    if args.max_steps is not None:
        cmd += ["--trainer.max_steps", str(args.max_steps),
                "--model.lr_scheduler.init_args.total_steps", str(args.max_steps)]  # fmt: skip
    if args.max_time is not None:
        cmd += ["--trainer.max_time", args.max_time]
    return cmd + shlex.split(args.fit_args)


def _run(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run ``cmd`` in the repository, output to ``log``; return (seconds, output). Raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    log.write_text(shlex.join(cmd) + "\n\n" + proc.stdout)
    if proc.returncode:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)}\n(see {log})\n{tail}")
    return seconds, proc.stdout


def _stopped_by(output: str) -> str:
    if re.search(r"`max_steps=\d+` reached", output):
        return "max_steps"
    if "Time limit reached" in output:
        return "max_time"
    return "other"


def ensure_data(variant: str, seed: int, args: argparse.Namespace, _planned: set[Path] = set()) -> Path:  # noqa: B006
    """The synthesized folder of ``variant`` and ``seed``, synthesizing it unless it exists (or, in a dry run, was
    already printed)."""
    folder = args.out / "data" / variant / f"seed{seed}"
    cmd = synthesis_command(variant, seed, folder, args.synthesis_args)
    if (folder / "triplets.jsonl").is_file() or folder in _planned:
        return folder
    _planned.add(folder)
    print(f"$ {shlex.join(cmd)}", flush=True)
    if not args.dry_run:
        seconds, _ = _run(cmd, folder / "synthesize.log")
        (folder / "timing.json").write_text(json.dumps({"synthesis_s": round(seconds, 1)}, indent=2))
    return folder


def run_row(name: str, seed: int, args: argparse.Namespace) -> dict | None:
    """Run (or resume) one row and seed; return its metrics and times (None in a dry run)."""
    row, run_dir = ROWS[name], args.out / name / f"seed{seed}"
    data_dir = None if row.variant is None else ensure_data(row.variant, seed, args)
    cmd = fit_command(row, seed, run_dir, data_dir, args)
    metrics_path, timing_path = run_dir / "metrics.json", run_dir / "timing.json"
    if metrics_path.is_file():
        print(f"[{name} seed {seed}] done before: {metrics_path}", flush=True)
    else:
        print(f"$ {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            return None
        seconds, output = _run(cmd, run_dir / "fit.log")
        if not metrics_path.is_file():
            raise RuntimeError(f"{shlex.join(cmd)} wrote no {metrics_path} (see {run_dir / 'fit.log'})")
        timing_path.write_text(json.dumps({"fit_s": round(seconds, 1), "stopped_by": _stopped_by(output)}, indent=2))
    metrics = json.loads(metrics_path.read_text())
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    return {"row": name, "seed": seed, **{k: metrics[k] for k in METRICS}, **timing}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def summarize(results: list[dict]) -> tuple[str, dict]:
    """The markdown table (mean ± std over seeds) and its JSON form."""
    lines = ["| row | " + " | ".join(m.split("/")[-1] for m in METRICS) + " | fit time (s) | seeds | note |",
             "|---|" + "---|" * (len(METRICS) + 3)]  # fmt: skip
    summary = {}
    for name in dict.fromkeys(r["row"] for r in results):
        runs = [r for r in results if r["row"] == name]
        times = [r["fit_s"] for r in runs if "fit_s" in r]
        capped = sum(r.get("stopped_by") == "max_time" for r in runs)
        note = f"{capped} run(s) stopped by max_time" if capped else ""
        cells = [_mean_std([r[m] for r in runs]) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean_std(times)} | {len(runs)} | {note} |")
        summary[name] = {
            **{m: {"mean": statistics.mean([r[m] for r in runs]), "values": [r[m] for r in runs]} for m in METRICS},
            "fit_s": times,
            "seeds": [r["seed"] for r in runs],
            "stopped_by_max_time": capped,
        }
    return "\n".join(lines), summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablations", help="output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps (and the schedule length)")
    parser.add_argument("--max-time", default=None, help="override trainer.max_time, e.g. 00:00:02:00")
    parser.add_argument("--fit-args", default="", help='extra `coalign fit` flags, one string ("--a 1 --b 2")')
    parser.add_argument("--synthesis-args", default="", help="extra `coalign synthesize` flags, one string")
    parser.add_argument("--json", type=Path, default=None, help="results file (default OUT/results.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid rows: {', '.join(ROWS)}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    for name in args.rows:
        for seed in args.seeds:
            result = run_row(name, seed, args)
            if result is not None:
                results.append(result)
    if args.dry_run:
        return 0
    table, summary = summarize(results)
    print("\nShapes test split, zero-shot ablations (R@K in %, mean ± std over seeds)\n\n" + table)
    path = args.json or args.out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"table": table, "rows": summary, "runs": results}, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
