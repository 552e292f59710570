"""The CIRHS synthesis pipeline (installed as ``coalign.synthesis``): prompts -> render -> filter -> assemble.

Run it with ``coalign synthesize --config configs/synthesis/cirhs.yaml --output DIR`` or from Python::

    from coalign.synthesis import load_config, launch, run
    config = load_config("configs/synthesis/tiny.yaml")
    run(config, launch("out/tiny"))

The on-disk format and every design choice the paper leaves open are documented in ``synthesis/README.md``.
Nothing here imports diffusers until the render stage loads a pipeline, and ``import coalign.synthesis`` itself
imports nothing heavy: the names below load their module on first use (PEP 562), so ``coalign synthesize --help``
needs only the config dataclasses.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module of this package that defines it
_EXPORTS = {
    "STAGES": "pipeline",
    "DATASET_FILES": "assemble",
    "AssembleConfig": "config",
    "ChatBackend": "backends",
    "GroupError": "groups",
    "JudgeBackend": "backends",
    "RenderBackend": "backends",
    "ScorerBackend": "backends",
    "ClipFilterConfig": "config",
    "FilterConfig": "config",
    "ImageCheck": "filter",
    "ImageCheckConfig": "config",
    "JudgeConfig": "config",
    "ModelSpec": "config",
    "PairFilter": "filter",
    "PairInput": "filter",
    "PromptsConfig": "config",
    "RenderConfig": "config",
    "RunContext": "runner",
    "SynthesisConfig": "config",
    "Taxonomy": "config",
    "grid_shape": "backends",
    "group_triplets": "assemble",
    "launch": "runner",
    "list_backends": "backends",
    "load_config": "cli",
    "parse_group": "groups",
    "push_to_hub": "assemble",
    "register_backend": "backends",
    "run": "pipeline",
    "split_grid": "backends",
    "synthesize_command": "cli",
}

__all__ = [
    "STAGES",
    "DATASET_FILES",
    "AssembleConfig",
    "ChatBackend",
    "GroupError",
    "JudgeBackend",
    "RenderBackend",
    "ScorerBackend",
    "ClipFilterConfig",
    "FilterConfig",
    "ImageCheck",
    "ImageCheckConfig",
    "JudgeConfig",
    "ModelSpec",
    "PairFilter",
    "PairInput",
    "PromptsConfig",
    "RenderConfig",
    "RunContext",
    "SynthesisConfig",
    "Taxonomy",
    "grid_shape",
    "group_triplets",
    "launch",
    "list_backends",
    "load_config",
    "parse_group",
    "push_to_hub",
    "register_backend",
    "run",
    "split_grid",
    "synthesize_command",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module == "backends":  # the registered backends are those the pipeline's modules define
        importlib.import_module(f"{__name__}.pipeline")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
