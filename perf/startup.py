"""Start-up time of `import coalign`, `coalign --help` and every subcommand's --help, against `import torch`.

Each command runs in a fresh interpreter (what a user waits for), all of them side by side: one warm-up round
(discarded: it fills the file cache), then ``--repeats`` rounds, each running every command once in turn, so a
change of machine load hits every command alike. Every run gets the same environment (thread counts pinned to
``--threads``). Prints the median wall time of each command and its ratio to the median of ``import torch``, with
the machine load (``uptime``) before and after; ``--json FILE`` also writes the numbers.

    python perf/startup.py                       # every command, 5 rounds
    python perf/startup.py --repeats 3 --only torch coalign help fit-help

The targets (issue 12): `coalign --help` and a subcommand's --help within 1.5x, `import coalign` within 1.3x of
`import torch`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coalign.cli", *args]


#: name -> command; "torch" is the yardstick
COMMANDS: dict[str, list[str]] = {
    "torch": [sys.executable, "-c", "import torch"],
    "lightning": [sys.executable, "-c", "import lightning.pytorch"],
    "coalign": [sys.executable, "-c", "import coalign"],
    "help": _cli("--help"),
    "version": _cli("--version"),
    "synthesize-help": _cli("synthesize", "--help"),
    "evaluate-help": _cli("evaluate", "--help"),
    "check-submission-help": _cli("check-submission", "--help"),
    "index-help": _cli("index", "--help"),
    "search-help": _cli("search", "--help"),
    "fit-help": _cli("fit", "--help"),
    "validate-help": _cli("validate", "--help"),
    "test-help": _cli("test", "--help"),
    "predict-help": _cli("predict", "--help"),
}

TARGETS = {"coalign": 1.3}  # every other coalign command: 1.5


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _time(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every run")
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), help="a subset of the commands (torch is kept)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = ["torch", *[n for n in (args.only or COMMANDS) if n != "torch"]]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    load_before = _uptime()
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(args.repeats + 1):
        for name in names:
            elapsed = _time(COMMANDS[name], env)
            if round_:  # round 0 warms the file cache
                times[name].append(elapsed)
    load_after = _uptime()
    base = statistics.median(times["torch"])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        target = None if name in ("torch", "lightning") else TARGETS.get(name, 1.5)
        rows.append({"command": name, "median_s": round(median, 3), "ratio": round(median / base, 2), "target": target,
                     "runs_s": [round(t, 3) for t in times[name]]})  # fmt: skip
    print(f"python {sys.version.split()[0]}, {args.repeats} rounds + 1 warm-up, {args.threads} thread(s)")
    print(f"load before: {load_before}\nload after:  {load_after}\n")
    print(f"| {'command':<22} | median s | x import torch | target |")
    print(f"|{'-' * 24}|---------:|---------------:|-------:|")
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']}x {'ok' if r['ratio'] <= r['target'] else 'MISSED'}"
        print(f"| {r['command']:<22} | {r['median_s']:8.2f} | {r['ratio']:14.2f} | {target:>6} |")
    if args.json:
        result = {"rows": rows, "load_before": load_before, "load_after": load_after, "repeats": args.repeats}
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
