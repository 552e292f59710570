"""The whole pipeline: CLI, dataset folder, resume after a crash or a kill, two ranks sharing stages, the hub."""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from _tiny_synthesis import (
    REPO,
    SUBPROCESS_ENV,
    TINY_CONFIG,
    baseline_dataset,
    dataset_fingerprint,
    run_tiny,
    tiny_config,
)

from coalign.io import read_json, read_jsonl
from coalign.synthesis import DATASET_FILES, SynthesisConfig, synthesize_command
from coalign.synthesis.cli import build_parser, synthesize
from coalign.synthesis.filter import FilterStage
from coalign.synthesis.prompts import PromptsStage
from coalign.synthesis.render import RenderStage


class Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so nothing in the pipeline may catch it."""


def test_baseline_dataset_folder_is_complete():
    out = baseline_dataset()
    triplets = read_jsonl(out / "triplets.jsonl")
    stats = read_json(out / "stats.json")
    counts = stats["counts"]
    assert counts["group_size"] == 4 and counts["groups_kept"] > 0 and len(triplets) == counts["triplets"]
    assert counts["triplets_by_direction"]["forward"] == counts["triplets_by_direction"]["backward"]
    assert counts["triplets_by_direction"]["forward"] == counts["members_kept"]
    assert counts["triplets_by_direction"].get("cross", 0) > 0
    assert {t["split"] for t in triplets} == {"train", "val"}
    for t in triplets:
        assert (out / t["reference"]).is_file() and (out / t["target"]).is_file()
        assert not Path(t["reference"]).is_absolute()
        assert (t["reference_id"], t["target_id"]) == (t["reference"], t["target"]) and isinstance(t["group"], int)
    by_group: dict[int, list] = {}
    for t in triplets:
        by_group.setdefault(t["group"], []).append(t)
    assert len(by_group) == counts["groups_kept"]
    for members in by_group.values():  # one split per group, and several targets in every group
        assert len({t["split"] for t in members}) == 1 and len({t["target"] for t in members}) >= 2
    assert max(len(m) for m in by_group.values()) >= 6  # a 4-panel group: up to 3 forward, 3 backward, 2 cross
    card = (out / "README.md").read_text()
    assert "composed-image-retrieval" in card and "tiny random model (test)" in card and "| judge |" in card
    assert "groups kept / dropped" in card and "group_size=4" in card
    assert stats["text_words"]["mean"] > 0 and set(stats["pass_rates"]) >= {"overall", "clip", "judge"}
    assert (out / "preview.png").stat().st_size > 0


@pytest.mark.parametrize(
    "crash_in",
    [
        pytest.param((PromptsStage, 3), marks=pytest.mark.slow),
        (RenderStage, 5),  # mid-block: the block of 4 holding the 6th item is recomputed whole
        pytest.param((FilterStage, 2), marks=pytest.mark.slow),
    ],
)
def test_a_run_that_crashes_mid_stage_resumes_to_the_same_dataset(tmp_path, monkeypatch, crash_in):
    cls, after = crash_in
    real = cls.write
    writes = []

    def write_then_die(self, index, result):
        if len(writes) == after:
            (self.ctx.out / "render").mkdir(parents=True, exist_ok=True)
            (self.ctx.out / "render" / ".tmp-q00000042.png.x").write_bytes(b"half a file")  # a torn write
            raise Killed
        writes.append(index)
        real(self, index, result)

    monkeypatch.setattr(cls, "write", write_then_die)
    with pytest.raises(Killed):
        run_tiny(tmp_path)
    monkeypatch.setattr(cls, "write", real)
    reports = run_tiny(tmp_path)
    assert reports["failed"] == {}
    assert dataset_fingerprint(tmp_path) == dataset_fingerprint(baseline_dataset())


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_same_dataset(tmp_path):
    cmd = [sys.executable, "-m", "coalign.synthesis", "--config", str(TINY_CONFIG), "--output", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, "--progress", "false"],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120  # kill once the first block of renders is on disk, while the next one runs
    while len(list(tmp_path.glob("render/items/*/*.json"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if (tmp_path / "triplets.jsonl").exists():
        pytest.skip("the run finished before it could be killed")
    assert run_tiny(tmp_path)["failed"] == {}
    assert dataset_fingerprint(tmp_path) == dataset_fingerprint(baseline_dataset())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(out: Path, *args: str) -> dict[str, dict[int, int]]:
    """Run the CLI on two CPU processes (Fabric, gloo); return items processed per stage and rank."""
    cmd = [
        sys.executable,
        "-m",
        "coalign.synthesis",
        "--config",
        str(TINY_CONFIG),
        "--output",
        str(out),
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--progress",
        "false",
        *args,
    ]
    env = {**SUBPROCESS_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank logs "rank R STAGE: N items on this rank, D already done, P processed, F failed"
    processed: dict[str, dict[int, int]] = {}
    for line in proc.stderr.splitlines():
        if " items on this rank" in line:
            head, tail = line.split("coalign.synthesis INFO rank ")[1].split(":", 1)
            rank, stage = head.split(" ", 1)
            processed.setdefault(stage, {})[int(rank)] = int(tail.split(", ")[2].split()[0])
    return processed


def test_two_cpu_ranks_share_a_stage_without_overlap_or_loss(tmp_path):
    processed = _run_two_ranks(tmp_path, "--stage", "prompts")
    assert processed == {"prompts": {0: 4, 1: 4}}  # shards of 4: rank 0 takes shard 0, rank 1 shard 1
    items = sorted(p.name for p in tmp_path.glob("prompts/items/*/*.json"))
    assert items == [f"q{i:08d}.json" for i in range(8)]
    # batches never cross a shard, so two ranks write bitwise what one process wrote
    merged = (tmp_path / "prompts" / "groups.jsonl").read_text()
    assert merged == (baseline_dataset() / "prompts" / "groups.jsonl").read_text()


@pytest.mark.slow
def test_two_cpu_ranks_run_the_whole_pipeline_to_the_same_dataset(tmp_path):
    processed = _run_two_ranks(tmp_path)
    base = read_json(baseline_dataset() / "filter" / "report.json")
    assert sum(processed["render"].values()) == base["rendered"]
    assert sum(processed["filter"].values()) == base["rendered"]
    assert all(len(ranks) == 2 for ranks in processed.values())
    assert dataset_fingerprint(tmp_path) == dataset_fingerprint(baseline_dataset())


def test_cli_runs_all_stages_and_pushes_the_dataset_folder(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch("huggingface_hub.HfApi") as api:
            api.return_value.upload_folder.return_value = "https://hf.co/datasets/me/tiny/commit/1"
            argv = [
                "--config",
                str(TINY_CONFIG),
                "--output",
                str(tmp_path),
                "--accelerator",
                "cpu",
                "--progress",
                "false",
                "--push_to_hub",
                "me/tiny",
                "--private",
                "true",
            ]
            assert synthesize_command(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert dataset_fingerprint(tmp_path) == dataset_fingerprint(baseline_dataset())
    api.return_value.create_repo.assert_called_once_with("me/tiny", repo_type="dataset", private=True, exist_ok=True)
    kwargs = api.return_value.upload_folder.call_args.kwargs
    assert kwargs["repo_type"] == "dataset" and kwargs["folder_path"] == str(tmp_path)
    assert kwargs["allow_patterns"] == DATASET_FILES
    assert "[assemble]" in capsys.readouterr().out


def test_help_lists_stages_and_config_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--stage",
        "--devices",
        "--prompts.num_groups",
        "--prompts.group_size",
        "--render.composite",
        "--push_to_hub",
    ):
        assert option in text


def test_every_config_field_is_an_option_of_the_command():
    params = inspect.signature(synthesize).parameters
    assert {f.name for f in dataclasses.fields(SynthesisConfig)} <= set(params)
    for f in dataclasses.fields(SynthesisConfig):  # the command's defaults are the config's
        assert params[f.name].default == getattr(SynthesisConfig(), f.name)


def test_a_user_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    argv = ["--config", str(TINY_CONFIG), "--output", str(tmp_path), "--stage", "render", "--accelerator", "cpu"]
    argv += ["--progress", "false"]
    assert synthesize_command(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("coalign synthesize: error: ") and "run the prompts stage first" in err
    assert "Traceback" not in err


def test_resuming_with_different_settings_is_refused(tmp_path):
    run_tiny(tmp_path, tiny_config("--prompts.num_groups", "0"), stages=("prompts",))
    with pytest.raises(ValueError, match=r"prompts settings differ .*temperature"):
        run_tiny(tmp_path, tiny_config("--prompts.temperature", "0.5"), stages=("prompts",))
    # speed knobs and the dedup threshold may change between a run and its resume
    run_tiny(tmp_path, tiny_config("--prompts.num_groups", "0", "--prompts.batch_size", "2"), stages=("prompts",))


def test_a_later_stage_before_its_input_exists_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the prompts stage first"):
        run_tiny(tmp_path, stages=("render",))
