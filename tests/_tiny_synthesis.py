"""Helpers for the synthesis tests: the tiny config, in-process runs, and a dataset fingerprint to compare runs.

``baseline_dataset()`` runs the whole tiny pipeline once per test session (cached) in one process; other tests
compare their interrupted, resumed or distributed runs against it.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from coalign.synthesis import RunContext, SynthesisConfig, load_config, run

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "synthesis" / "tiny.yaml"

# Subprocesses: one thread each (the machine's cores are shared; oversubscribed torch threads crawl), offline.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_config(*overrides: str) -> SynthesisConfig:
    """``configs/synthesis/tiny.yaml`` with command-line style overrides (``"--seed", "1"``)."""
    return load_config(TINY_CONFIG, list(overrides))


def run_tiny(out: Path, config: SynthesisConfig | None = None, stages=None, **kwargs: Any) -> dict[str, Any]:
    """Run the pipeline in this process (single rank) with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = RunContext(out=Path(out), progress=False)
        config = config or tiny_config()
        return run(config, ctx, **({"stages": stages} if stages else {}), **kwargs)
    finally:
        torch.set_num_threads(threads)


def dataset_fingerprint(out: Path) -> dict[str, str]:
    """``triplets.jsonl``, the bytes of every image it references and of every parquet shard (the Hub's format):
    equal fingerprints, equal datasets."""
    out = Path(out)
    fp = {"triplets.jsonl": (out / "triplets.jsonl").read_text()}
    shards = sorted((out / "data").glob("*.parquet"))
    assert shards, f"{out} has no parquet shards"
    for path in [*sorted((out / "images").glob("*/*.png")), *shards]:
        fp[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return fp


@functools.cache
def baseline_dataset() -> Path:
    """The tiny pipeline run once, uninterrupted, in one process (cached for the session)."""
    out = Path(tempfile.mkdtemp(prefix="coalign-synth-baseline-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    reports = run_tiny(out)
    assert reports["failed"] == {}, reports["failed"]
    return out


def copy_dataset(src: Path, dst: Path) -> Path:
    """A copy of a run folder (hard links become copies, so the copy can be damaged safely)."""
    shutil.copytree(src, dst)
    return dst
