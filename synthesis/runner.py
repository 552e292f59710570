"""The loop every stage shares: take this rank's shards, skip finished items, process in batches, write atomically.

A stage only says how to list its items, how to tell one is done, how to process a batch and how to write one
result. Everything a long run needs is here, once:

* **Sharding.** Items are grouped into shards of ``shard_size`` consecutive ids; rank ``r`` of ``world_size``
  takes the shards ``s`` with ``s % world_size == r``. Ranks never touch the same item, and a rerun with another
  world size still finds every finished item on disk.
* **Resuming.** An item is done when its output file exists (outputs are written atomically, see :mod:`coalign.io`).
  Models are loaded only when a rank has work left, so resuming a finished stage costs a directory scan.
* **Same batches on resume.** Seeds are per item, but batched kernels still differ from unbatched ones in the last
  bits, enough to flip a sampled token or a pixel. So each shard is cut into fixed blocks of ``batch_size`` and a
  block is processed whole even when some of its items were written before an interruption (only the missing
  ones are written). Every item then meets the same batch as in an uninterrupted run, on any number of ranks, and
  a resumed or distributed run writes bitwise the same outputs (same batch sizes, deterministic kernels).
* **Failures.** When a batch raises, its items are retried one by one to isolate the culprit. An item that still
  raises gets a record under ``OUT/failures/<stage>/`` and no output, so the next run retries it; it is never
  silently lost. A later success deletes the record.
* **Writes off the critical path.** Results are written by one background thread while the next block runs.
* **Progress.** A tqdm bar per stage on rank 0 (items/s and ETA over rank 0's shards; ranks get equal shares).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from coalign.io import atomic_write_json, read_json

from ._io import clear_failure, failed_indices, record_failure, shard_of

__all__ = ["RunContext", "Stage", "StageSummary", "launch", "run_stage", "check_settings"]

log = logging.getLogger("coalign.synthesis")


@dataclass
class RunContext:
    """Where this process stands in a (possibly distributed) run.

    Args:
        out: output folder shared by all ranks.
        rank: global rank.
        world_size: number of processes.
        device: the device this rank's models go to.
        fabric: the Lightning ``Fabric`` that launched the ranks (None for a plain single process).
        progress: draw progress bars (rank 0 only).
    """

    out: Path
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fabric: Any = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int, shard_size: int) -> bool:
        return shard_of(index, shard_size) % self.world_size == self.rank

    def barrier(self, name: str = "") -> None:
        if self.fabric is not None and self.world_size > 1:
            self.fabric.barrier(name)


def launch(
    out: Path,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    barrier_timeout_hours: float = 72.0,
    progress: bool = True,
) -> RunContext:
    """Start (or join) the processes of a run through Lightning Fabric and return this rank's context.

    The same call runs one CPU process, several GPUs of a node (Fabric relaunches the command once per device)
    or several nodes (under SLURM or ``torchrun``). Barriers wait for the slowest rank to finish its shards,
    which on a big stage can take hours, hence a timeout far above torch's default of minutes.
    """
    # lightning.fabric: heavy (the whole Lightning stack), needed only to launch a run, not to read its outputs
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy  # heavy, as above

    many = num_nodes > 1 or devices not in (1, "1")
    # ranks only ever meet at barriers (no tensor collectives), so gloo on the CPU serves every accelerator and
    # keeps NCCL's watchdog out of waits that last hours
    timeout = timedelta(hours=barrier_timeout_hours)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timeout) if many else "auto"
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    rank = fabric.global_rank
    return RunContext(
        out=out,
        rank=rank,
        world_size=fabric.world_size,
        device=fabric.device,
        fabric=fabric,
        progress=progress and rank == 0,
    )


class Stage(ABC):
    """One unit of per-item work with its own artifacts on disk.

    Attributes:
        name: stage name, used for the progress bar and the failures folder.
        batch_size: items per :meth:`process` call.
    """

    name: str = "stage"
    batch_size: int = 1

    def __init__(self, ctx: RunContext, shard_size: int):
        self.ctx = ctx
        self.shard_size = shard_size

    @abstractmethod
    def items(self) -> list[int]:
        """Indices of every item this stage should produce, across all ranks."""

    @abstractmethod
    def is_done(self, index: int) -> bool:
        """True when the output of ``index`` is complete on disk."""

    def done_items(self, indices: Sequence[int]) -> set[int]:
        """The finished items among ``indices`` (override with a directory listing when that is cheaper)."""
        return {i for i in indices if self.is_done(i)}

    def wanted(self, index: int) -> bool:
        """Whether this rank should produce ``index`` at all (checked only for its own items)."""
        return True

    def setup(self) -> None:  # noqa: B027 (optional hook)
        """Load models; called only when this rank has work left."""

    def teardown(self) -> None:  # noqa: B027 (optional hook)
        """Drop models (called after :meth:`setup`, also on errors)."""

    @abstractmethod
    def process(self, indices: Sequence[int]) -> list[Any]:
        """Results for ``indices``, in order. May raise; the runner isolates the failing item."""

    @abstractmethod
    def write(self, index: int, result: Any) -> None:
        """Write one result atomically."""


@dataclass
class StageSummary:
    """What one rank did in one stage."""

    name: str
    owned: int = 0
    done_before: int = 0
    processed: int = 0
    failed: list[int] = field(default_factory=list)


def _process_isolating(stage: Stage, batch: Sequence[int]) -> tuple[list[tuple[int, Any]], list[tuple[int, Exception]]]:
    try:
        return list(zip(batch, stage.process(batch), strict=True)), []
    except Exception as err:
        if len(batch) == 1:
            return [], [(batch[0], err)]
    ok, bad = [], []
    for index in batch:  # results are seeded per item, so one-by-one equals batched
        try:
            ok.append((index, stage.process([index])[0]))
        except Exception as err:
            bad.append((index, err))
    return ok, bad


def _write(stage: Stage, results: list[tuple[int, Any]], failed_before: set[int]) -> None:
    for index, result in results:
        stage.write(index, result)
        if index in failed_before:
            clear_failure(stage.ctx.out, stage.name, index, stage.shard_size)


def run_stage(stage: Stage) -> StageSummary:
    """Run this rank's share of ``stage``; see the module docstring for the guarantees."""
    ctx = stage.ctx
    owned = [i for i in stage.items() if ctx.owns(i, stage.shard_size) and stage.wanted(i)]
    done = stage.done_items(owned)
    # fixed blocks inside each shard: a resumed run recomputes a partly written block whole, and the world size
    # does not change which items share a batch
    shards: dict[int, list[int]] = {}
    for i in owned:
        shards.setdefault(shard_of(i, stage.shard_size), []).append(i)
    blocks = [
        items[s : s + stage.batch_size] for items in shards.values() for s in range(0, len(items), stage.batch_size)
    ]
    blocks = [b for b in blocks if not done.issuperset(b)]
    summary = StageSummary(stage.name, owned=len(owned), done_before=len(done))
    if not blocks:
        return summary
    failed_before = failed_indices(ctx.out, stage.name)
    stage.setup()
    bar = tqdm(
        total=len(owned),
        initial=len(done),
        desc=stage.name,
        unit="item",
        disable=not ctx.progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    # one writer thread: PNG encoding and file system latency overlap the next block's model call; at most
    # two blocks wait, which bounds the memory their results hold
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{stage.name}")
    pending: deque[Future] = deque()
    try:
        for block in blocks:
            ok, bad = _process_isolating(stage, block)
            ok = [(index, result) for index, result in ok if index not in done]
            pending.append(writer.submit(_write, stage, ok, failed_before))
            while len(pending) > 2:
                pending.popleft().result()
            for index, err in bad:
                log.warning("%s: item %d failed (%s); it will be retried on the next run", stage.name, index, err)
                record_failure(ctx.out, stage.name, index, stage.shard_size, err, ctx.rank)
                summary.failed.append(index)
            summary.processed += len(ok)
            bar.update(len(ok) + len(bad))
        while pending:
            pending.popleft().result()
    finally:
        writer.shutdown(wait=True)  # also on an interruption: what was computed is written, nothing half-written
        bar.close()
        stage.teardown()
    return summary


def check_settings(path: Path, settings: dict[str, Any], what: str) -> None:
    """Record the settings that determine a stage's outputs; refuse to mix outputs of different settings."""
    if path.is_file():
        previous = read_json(path)
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(
                f"{what} settings differ from those that produced {path.parent} (changed: {changed}). Resuming would "
                f"mix outputs of both; use a new --output folder, or delete {path.parent} to redo the stage."
            )
    else:
        atomic_write_json(path, settings)
