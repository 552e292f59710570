"""``coalign synthesize``: run the CIRHS pipeline, or one stage of it, on one CPU or many GPUs.

The command is :func:`synthesize`, parsed by :func:`coalign.command.run_command` like every ``coalign`` tool: the
fields of :class:`~.config.SynthesisConfig` (``seed``, ``shard_size``, ``prompts``, ``render``, ``filter``,
``assemble``) are its parameters, so a synthesis YAML such as ``configs/synthesis/cirhs.yaml`` *is* the
command's ``--config``, and every field can be overridden on the command line (``--render.image_size 768``).
``--help`` lists them with their documentation, ``--print_config`` prints the resolved options. A backend's
constructor argument is set like a model component's, ``--render.backend.init_args.stroke_rate 0``
(:func:`split_backend_overrides`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ArgumentParser

# the package, whose names load on first use: parsing (and --help) needs only the config dataclasses, the
# pipeline (torch, transformers) is imported when a run starts
import coalign.synthesis as pipeline
from coalign.command import build_parser as command_parser
from coalign.command import run_command

from .config import AssembleConfig, FilterConfig, PromptsConfig, RenderConfig, SynthesisConfig

__all__ = [
    "synthesize",
    "synthesize_command",
    "build_parser",
    "load_config",
    "split_backend_overrides",
    "merge_backend_overrides",
]

PROG = "coalign synthesize"

_DESCRIPTION = """Synthesize CIR triplets with the CIRHS recipe: an LLM describes groups (a source scene and its
edits; prompts), a text-to-image model renders each group as one composite grid split into panels (render), filters
keep the good (source, edit) pairs (filter), and each group becomes triplets under one group id with a dataset
card (assemble). Each stage skips finished items, so rerunning the same
command resumes an interrupted run. With --devices N (or several nodes) the ranks share every stage by shards."""

_EPILOG = """\
The exit status is 1 when some items failed (see OUTPUT/failures/): rerun the same command to retry them.

examples:
  coalign synthesize --config synthesis/tiny --output /tmp/tiny
  coalign synthesize --config synthesis/shapes --output data/shapes_cirhs         (procedural, no model download)
  coalign synthesize --config synthesis/cirhs --output data/cirhs --devices 8
  coalign synthesize --config synthesis/cirhs --output data/cirhs --stage render --devices 8
  coalign synthesize --config synthesis/tiny --output /tmp/tiny --prompts.num_groups 4
  coalign synthesize --config synthesis/shapes --output /tmp/s --render.backend.init_args.error_rate 0.5
  coalign synthesize --config synthesis/cirhs --output data/cirhs --stage assemble --push_to_hub me/cirhs

--config takes a YAML file or the name of a shipped one (synthesis/tiny, synthesis/shapes, synthesis/cirhs).
"""

_DEFAULTS = SynthesisConfig()


def synthesize(
    output: str,
    seed: int = _DEFAULTS.seed,
    shard_size: int = _DEFAULTS.shard_size,
    prompts: PromptsConfig = _DEFAULTS.prompts,
    render: RenderConfig = _DEFAULTS.render,
    filter: FilterConfig = _DEFAULTS.filter,
    assemble: AssembleConfig = _DEFAULTS.assemble,
    stage: Literal["prompts", "render", "filter", "assemble"] | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> int:
    """Run the CIRHS synthesis pipeline, or one stage of it.

    Args:
        output: output folder, shared by all ranks.
        seed: global seed; every item's sampling seed derives from it and the item id.
        shard_size: items per shard (one folder per shard and stage; ranks take whole shards).
        prompts: stage 1, a chat model describes groups (a source caption, its edits and their texts).
        render: stage 2, a text-to-image model renders each group as one composite grid, split into panels.
        filter: stage 3, the filter cascade (image check, CLIP score, multimodal-LLM judge).
        assemble: stage 4, triplets, dataset card, statistics and preview.
        stage: run only this stage (default: all four, in order).
        accelerator: cpu, cuda, auto ... (Lightning Fabric).
        devices: processes per node, one per GPU ('auto': all).
        num_nodes: nodes (launch under SLURM or torchrun).
        push_to_hub: after assemble, upload the dataset to this Hugging Face dataset repo id.
        private: create the hub repo as private.
        progress: progress bars (rank 0).

    Returns:
        0, or 1 when some items failed and need a rerun.
    """
    config = SynthesisConfig(
        seed=seed, shard_size=shard_size, prompts=prompts, render=render, filter=filter, assemble=assemble
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = pipeline.launch(Path(output), accelerator, devices, num_nodes, progress=progress)
    reports = pipeline.run(config, ctx, pipeline.STAGES if stage is None else (stage,))
    if not ctx.is_main:
        return 0
    for name, report in reports.items():
        if name != "failed":
            shown = ("counts", "filters", "groups", "members")
            brief = {k: v for k, v in report.items() if not isinstance(v, (list, dict)) or k in shown}
            print(f"[{name}] {json.dumps(brief)}")
    if reports["failed"]:
        print(f"items failed: {reports['failed']}; see {output}/failures/ and rerun the same command to retry them")
        return 1
    if push_to_hub:
        print(f"pushed: {pipeline.push_to_hub(output, push_to_hub, private=private)}")
    return 0


def build_parser() -> ArgumentParser:
    """The argument parser of ``coalign synthesize`` (the synthesis config fields at the top level of the YAML)."""
    return command_parser(synthesize, PROG, description=_DESCRIPTION, epilog=_EPILOG)


_BACKEND_ARG = re.compile(r"^--((?:\w+\.)+)backend\.init_args\.(\w+)(?:=(.*))?$", re.DOTALL)


def split_backend_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str, object]]]:
    """``argv`` without its ``--<stage>.backend.init_args.<name> VALUE`` arguments, and those as ``(stage, name,
    value)`` (values read as YAML: ``0``, ``0.5``, ``true``, ``[1, 2]``).

    A stage's ``backend`` is a ``{class_path, init_args}`` mapping that the parser takes whole (a nested key would
    land beside ``class_path``), so these are set after parsing, by :func:`merge_backend_overrides`.
    """
    argv, rest, changes = list(argv), [], []
    i = 0
    while i < len(argv):
        match = _BACKEND_ARG.match(argv[i])
        if match is None:
            rest.append(argv[i])
            i += 1
            continue
        if match.group(3) is None and i + 1 >= len(argv):
            raise ValueError(f"{argv[i]} needs a value")
        value = match.group(3) if match.group(3) is not None else argv[i + 1]
        changes.append((match.group(1)[:-1], match.group(2), yaml.safe_load(value)))
        i += 1 if match.group(3) is not None else 2
    return rest, changes


def merge_backend_overrides(config, changes: Sequence[tuple[str, str, object]]) -> None:
    """Set each ``(stage, name, value)`` in the ``init_args`` of the stage's backend in the parsed ``config``.

    Raises:
        ValueError: the stage has no backend (null, or a ``model:`` stage) to set an argument of.
    """
    for stage, name, value in changes:
        spec = config.get(f"{stage}.backend")
        if not isinstance(spec, dict):
            raise ValueError(
                f"--{stage}.backend.init_args.{name}: {stage} has no backend ({spec!r}) to set an argument of; "
                f"name one in the config (backend: {{class_path: ..., init_args: {{...}}}})"
            )
        config[f"{stage}.backend"] = {**spec, "init_args": {**(spec.get("init_args") or {}), name: value}}


def load_config(path: str | Path, overrides: list[str] | None = None) -> SynthesisConfig:
    """The config of a YAML file, with command-line style overrides such as ``["--seed", "3"]`` or
    ``["--render.backend.init_args.tint", "0"]``."""
    parser = build_parser()
    argv, changes = split_backend_overrides(["--config", str(path), "--output", "-", *(overrides or [])])
    config = parser.parse_args(argv)
    merge_backend_overrides(config, changes)
    init = parser.instantiate_classes(config)
    return SynthesisConfig(**{f.name: init[f.name] for f in dataclasses.fields(SynthesisConfig)})


def synthesize_command(argv: list[str]) -> int:
    """Entry point of ``coalign synthesize``; returns the exit status (1 when some items failed and need a rerun)."""
    try:
        argv, changes = split_backend_overrides(argv)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return run_command(
        synthesize,
        argv,
        PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        adjust=lambda config: merge_backend_overrides(config, changes),
    )
