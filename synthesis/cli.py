"""``coalign synthesize``: run the CIRHS pipeline, or one stage of it, on one CPU or many GPUs.

The command is :func:`synthesize`, parsed by :func:`coalign.command.run_command` like every ``coalign`` tool: the
fields of :class:`~.config.SynthesisConfig` (``seed``, ``shard_size``, ``prompts``, ``render``, ``filter``,
``assemble``) are its parameters, so a synthesis YAML such as ``configs/synthesis/cirhs.yaml`` *is* the
command's ``--config``, and every field can be overridden on the command line (``--render.image_size 768``).
``--help`` lists them with their documentation, ``--print_config`` prints the resolved options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

# the package, whose names load on first use: parsing (and --help) needs only the config dataclasses, the
# pipeline (torch, transformers) is imported when a run starts
import coalign.synthesis as pipeline
from coalign.command import build_parser as command_parser
from coalign.command import run_command

from .config import AssembleConfig, FilterConfig, PromptsConfig, RenderConfig, SynthesisConfig

__all__ = ["synthesize", "synthesize_command", "build_parser", "load_config"]

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


def load_config(path: str | Path, overrides: list[str] | None = None) -> SynthesisConfig:
    """The config of a YAML file, with command-line style overrides such as ``["--seed", "3"]``."""
    parser = build_parser()
    init = parser.instantiate_classes(parser.parse_args(["--config", str(path), "--output", "-", *(overrides or [])]))
    return SynthesisConfig(**{f.name: init[f.name] for f in dataclasses.fields(SynthesisConfig)})


def synthesize_command(argv: list[str]) -> int:
    """Entry point of ``coalign synthesize``; returns the exit status (1 when some items failed and need a rerun)."""
    return run_command(synthesize, argv, PROG, description=_DESCRIPTION, epilog=_EPILOG)
