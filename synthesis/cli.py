"""``coalign synthesize``: run the CIRHS pipeline, or one stage of it, on one CPU or many GPUs.

Examples::

    coalign synthesize --config configs/synthesis/cirhs.yaml --output data/cirhs
    coalign synthesize --config configs/synthesis/cirhs.yaml --output data/cirhs --stage render --devices 8
    coalign synthesize --config configs/synthesis/tiny.yaml --output /tmp/tiny --prompts.num_quadruples 4

Every option of the config can be overridden on the command line (``--render.image_size 768``); ``--help``
lists them with their documentation, ``--print_config`` prints the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from .config import SynthesisConfig

__all__ = ["synthesize_command", "build_parser", "load_config"]

_DESCRIPTION = """Synthesize CIR triplets with the CIRHS recipe: an LLM writes caption quadruples (prompts), a
text-to-image model renders each as an image pair (render), filters keep the good pairs (filter), and the pairs
become grouped triplets with a dataset card (assemble). Each stage skips finished items, so rerunning the same
command resumes an interrupted run. With --devices N (or several nodes) the ranks share every stage by shards."""


def build_parser() -> ArgumentParser:
    """The argument parser of ``coalign synthesize`` (config fields at the top level of the YAML)."""
    parser = ArgumentParser(prog="coalign synthesize", description=_DESCRIPTION)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config, e.g. configs/synthesis/cirhs.yaml")
    parser.add_argument("--output", type=str, required=True, help="output folder, shared by all ranks")
    parser.add_argument(
        "--stage",
        type=Literal["prompts", "render", "filter", "assemble"] | None,
        default=None,
        help="run only this stage (default: all four, in order)",
    )
    parser.add_argument("--accelerator", type=str, default="auto", help="cpu, cuda, auto ... (Lightning Fabric)")
    parser.add_argument("--devices", type=int | str, default=1, help="processes per node, one per GPU ('auto': all)")
    parser.add_argument("--num_nodes", type=int, default=1, help="nodes (launch under SLURM or torchrun)")
    parser.add_argument(
        "--push_to_hub",
        type=str | None,
        default=None,
        help="after assemble, upload the dataset to this Hugging Face dataset repo id",
    )
    parser.add_argument("--private", type=bool, default=False, help="create the hub repo as private")
    parser.add_argument("--progress", type=bool, default=True, help="progress bars (rank 0)")
    parser.add_class_arguments(SynthesisConfig, nested_key=None)
    return parser


def _config_from(parser: ArgumentParser, args) -> SynthesisConfig:
    init = parser.instantiate(args)
    return SynthesisConfig(**{f.name: getattr(init, f.name) for f in dataclasses.fields(SynthesisConfig)})


def load_config(path: str | Path, overrides: list[str] | None = None) -> SynthesisConfig:
    """The config of a YAML file, with command-line style overrides such as ``["--seed", "3"]``."""
    parser = build_parser()
    return _config_from(parser, parser.parse_args(["--config", str(path), "--output", "-", *(overrides or [])]))


def synthesize_command(argv: list[str]) -> int:
    """Entry point of ``coalign synthesize``; returns the exit status (1 when some items failed and need a rerun)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = _config_from(parser, args)

    from .pipeline import STAGES, run
    from .runner import launch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = launch(Path(args.output), args.accelerator, args.devices, args.num_nodes, progress=args.progress)
    reports = run(config, ctx, STAGES if args.stage is None else (args.stage,))
    if not ctx.is_main:
        return 0
    for stage, report in reports.items():
        if stage != "failed":
            brief = {k: v for k, v in report.items() if not isinstance(v, (list, dict)) or k in ("counts", "filters")}
            print(f"[{stage}] {json.dumps(brief)}")
    if reports["failed"]:
        print(
            f"items failed: {reports['failed']}; see {args.output}/failures/ and rerun the same command to retry them"
        )
        return 1
    if args.push_to_hub:
        from .assemble import push_to_hub

        print(f"pushed: {push_to_hub(args.output, args.push_to_hub, private=args.private)}")
    return 0
