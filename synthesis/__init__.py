"""The CIRHS synthesis pipeline (installed as ``coalign.synthesis``): prompts -> render -> filter -> assemble.

Run it with ``coalign synthesize --config configs/synthesis/cirhs.yaml --output DIR`` or from Python::

    from coalign.synthesis import load_config, launch, run
    config = load_config("configs/synthesis/tiny.yaml")
    run(config, launch("out/tiny"))

The on-disk format and every design choice the paper leaves open are documented in ``synthesis/README.md``.
Nothing here imports diffusers until the render stage loads a pipeline.
"""

from .assemble import DATASET_FILES, group_triplets, push_to_hub
from .backends import (
    ChatBackend,
    JudgeBackend,
    RenderBackend,
    ScorerBackend,
    grid_shape,
    list_backends,
    register_backend,
    split_grid,
)
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
from .groups import GroupError, parse_group
from .pipeline import STAGES, run
from .runner import RunContext, launch

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
