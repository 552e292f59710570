"""The CIRHS synthesis pipeline (installed as ``coalign.synthesis``): prompts -> render -> filter -> assemble.

Run it with ``coalign synthesize --config configs/synthesis/cirhs.yaml --output DIR`` or from Python::

    from coalign.synthesis import load_config, launch, run
    config = load_config("configs/synthesis/tiny.yaml")
    run(config, launch("out/tiny"))

The on-disk format and every design choice the paper leaves open are documented in ``synthesis/README.md``.
Nothing here imports diffusers until the render stage loads a pipeline.
"""

from .assemble import DATASET_FILES, push_to_hub
from .cli import load_config, synthesize_command
from .config import (
    AssembleConfig,
    ClipFilterConfig,
    FilterConfig,
    ImageCheckConfig,
    JudgeConfig,
    ModelSpec,
    PromptsConfig,
    RenderConfig,
    SynthesisConfig,
    Taxonomy,
)
from .filter import ImageCheck, PairFilter, PairInput
from .pipeline import STAGES, run
from .quadruples import QuadrupleError, parse_quadruple
from .render import split_composite
from .runner import RunContext, launch

__all__ = [
    "STAGES",
    "DATASET_FILES",
    "AssembleConfig",
    "ClipFilterConfig",
    "FilterConfig",
    "ImageCheck",
    "ImageCheckConfig",
    "JudgeConfig",
    "ModelSpec",
    "PairFilter",
    "PairInput",
    "PromptsConfig",
    "QuadrupleError",
    "RenderConfig",
    "RunContext",
    "SynthesisConfig",
    "Taxonomy",
    "launch",
    "load_config",
    "parse_quadruple",
    "push_to_hub",
    "run",
    "split_composite",
    "synthesize_command",
]
