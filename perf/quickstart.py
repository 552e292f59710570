"""Does the quickstart keep its promise on a busy machine? (PERFORMANCE.md, "Quickstart")

Runs the README's quickstart command, ``coalign fit --config configs/quickstart.yaml``, in fresh subprocesses:
once as it is ("idle": whatever else the machine runs), and once beside ``--busy`` processes that each spin one
core at 100 % for the whole run ("loaded": on a 2-core box, ``--busy 1`` leaves one free core, the case of a
user's laptop running something else). For each run it records the wall time of the whole command (start-up,
data, training, the test split), the training steps actually run (a ``max_time`` cap would stop it early), the
test split's R@1/R@5/R@10 and the load average before and after, and checks the promise:
R@1 >= 80 and R@10 >= 95 within 5 minutes.

Usage::

    python perf/quickstart.py                       # idle, then with one busy process
    python perf/quickstart.py --cases loaded --busy 1 --out runs/perf_quickstart

The two cases run one after the other (not interleaved: each is a whole training run), so say how loaded the
machine was, which the script prints and writes to ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMISE = {"R@1": 80.0, "R@10": 95.0, "seconds": 300.0}
BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def _steps(root: Path) -> int | None:
    """Training steps run, from the newest checkpoint's ``global_step`` (no unpickling of arbitrary objects)."""
    found = sorted(root.glob("**/*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    if not found:
        return None
    return int(torch.load(found[-1], map_location="cpu", weights_only=True)["global_step"])


def run_case(name: str, busy: int, out: Path, extra: list[str]) -> dict:
    root = out / name
    command = [sys.executable, "-m", "coalign.cli", "fit", "--config", "configs/quickstart.yaml"]
    command += ["--trainer.default_root_dir", str(root), *extra]
    spinners = [
        subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=900)], stdout=subprocess.DEVNULL)
        for _ in range(busy)
    ]
    try:
        load_before = os.getloadavg()
        start = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - start
        load_after = os.getloadavg()
    finally:
        for p in spinners:
            p.kill()
    metrics_file = root / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    result = {
        "case": name,
        "busy_processes": busy,
        "exit_code": code,
        "seconds": round(seconds, 1),
        "steps": _steps(root),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        **{k: round(metrics.get(f"shapes/{k}", float("nan")), 2) for k in ("R@1", "R@5", "R@10")},
    }
    result["promise_kept"] = bool(
        code == 0
        and result["R@1"] >= PROMISE["R@1"]
        and result["R@10"] >= PROMISE["R@10"]
        and seconds <= PROMISE["seconds"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="idle,loaded", help="comma-separated: idle, loaded")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded case")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "perf_quickstart")
    parser.add_argument("--fit-args", default="", help="extra `coalign fit` flags, e.g. '--trainer.max_steps 50'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases.split(","):
        busy = args.busy if case == "loaded" else 0
        result = run_case(case, busy, args.out, args.fit_args.split())
        results.append(result)
        print(json.dumps(result), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"cores: {os.cpu_count()}, torch threads by default: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
