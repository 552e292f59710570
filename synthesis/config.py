"""The synthesis configuration: plain dataclasses of names and numbers, parsed from YAML by jsonargparse.

The field docstrings below are what ``coalign synthesize --help`` prints. Defaults describe a real run
(``configs/synthesis/cirhs.yaml`` spells them out); ``configs/synthesis/tiny.yaml`` swaps every model for a tiny
random one built offline.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "check_backend",
    "ModelSpec",
    "Taxonomy",
    "PromptsConfig",
    "RenderConfig",
    "ImageCheckConfig",
    "ClipFilterConfig",
    "JudgeConfig",
    "FilterConfig",
    "AssembleConfig",
    "SynthesisConfig",
    "fingerprint",
]


@dataclass
class ModelSpec:
    """A model to load by hub id or local folder, or a tiny random one built offline.

    Args:
        name: Hugging Face hub id or local folder, passed to ``from_pretrained``. Ignored when ``tiny``.
        tiny: build a tiny random model from an in-code config instead (tests, CI, benchmarks: no download).
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU, where bf16 is slower), ``float32``, ``bfloat16`` or
            ``float16``.
        revision: hub revision (branch, tag or commit) to pin, for reproducible data.
    """

    name: str | None = None
    tiny: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.tiny and not self.name:
            raise ValueError("a model needs a `name` (hub id or local folder) or `tiny: true`")

    def describe(self) -> str:
        """What the dataset card names as the model."""
        return "tiny random model (test)" if self.tiny else str(self.name)


_BACKEND_KEYS = {"class_path", "init_args"}


def check_backend(spec: dict[str, Any] | None, where: str) -> None:
    """Validate a stage's ``backend`` field: null, or ``{class_path: <registered backend>, init_args: {...}}``.

    It is a plain dict rather than a dataclass: jsonargparse would read a ``class_path`` key as a class to import.
    """
    if spec is None:
        return
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("class_path"), str)
        or set(spec) - {"class_path", "init_args"}
    ):
        raise ValueError(
            f"{where} must be {{class_path: <registered backend>, init_args: {{...}}}} or null, got {spec!r}"
        )
    if not isinstance(spec.get("init_args", {}), dict):
        raise ValueError(f"{where}.init_args must be a mapping of constructor arguments, got {spec['init_args']!r}")


def _default_domains() -> list[str]:
    return [
        "clothing and fashion",
        "shoes and accessories",
        "furniture and interiors",
        "kitchen and food",
        "pets and domestic animals",
        "wild animals",
        "birds",
        "cars and vehicles",
        "city streets",
        "landscapes",
        "beaches and coasts",
        "sports",
        "musical instruments",
        "electronics and gadgets",
        "toys and games",
        "plants and flowers",
        "people at work",
        "people in everyday scenes",
        "buildings and architecture",
        "art and crafts",
    ]


def _default_edit_types() -> dict[str, str]:
    return {
        "attribute": "change the color, material, texture or pattern of one object",
        "count": "change how many of one kind of object there are",
        "add": "add one object to the scene",
        "remove": "remove one object from the scene",
        "spatial": "change where an object is, or how the objects are arranged",
        "style": "change the lighting, weather, season, time of day or artistic style",
        "viewpoint": "change the camera angle, distance or framing",
        "action": "change the pose, action or expression of a person or animal",
        "background": "replace the background or setting while keeping the main subject",
    }


@dataclass
class Taxonomy:
    """What the LLM is asked to write about: each group draws one domain and one edit type, seeded by its id.

    Args:
        domains: subject domains.
        edit_types: edit type name -> one-line description shown to the LLM.
    """

    domains: list[str] = field(default_factory=_default_domains)
    edit_types: dict[str, str] = field(default_factory=_default_edit_types)

    def __post_init__(self) -> None:
        if not self.domains or not self.edit_types:
            raise ValueError("the taxonomy needs at least one domain and one edit type")


@dataclass
class PromptsConfig:
    """Stage 1: a chat model describes each group as JSON: a source caption and ``group_size - 1`` edits of it.

    Args:
        num_groups: groups to ask for (ids ``q00000000`` ...); raise it on a later run to extend a dataset.
        group_size: panels per group: the source and ``group_size - 1`` edited scenes, rendered together
            (2 gives the paper's plain pairs).
        cross: also ask for edit -> edit modification texts between consecutive edits (edit ``i`` -> ``i + 1``),
            which give extra triplets inside the group.
        llm: the chat model of the default backend (any transformers causal LM with a chat template).
        backend: a registered ``ChatBackend`` instead of the default (``llm``), or null.
        constrained: JSON-constrained decoding (default backend): the model only chooses the words inside the
            strings, so every answer parses. Lengths and content are still validated.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: token budget of one answer.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        max_retries: new samples (with fresh seeds) for an answer that fails validation, before the item is
            counted as malformed and skipped.
        min_caption_words: shortest accepted caption.
        max_caption_words: longest accepted caption.
        min_text_words: shortest accepted modification text.
        max_text_words: longest accepted modification text.
        dedup_threshold: Jaccard similarity of word bigrams (over all captions of a group) above which a group
            is a near-duplicate of an earlier one and is dropped.
        taxonomy: the domains and edit types sampled for diversity.
    """

    num_groups: int = 1000
    group_size: int = 4
    cross: bool = True
    llm: ModelSpec = field(default_factory=lambda: ModelSpec(name="Qwen/Qwen2.5-7B-Instruct"))
    backend: dict[str, Any] | None = None
    constrained: bool = True
    batch_size: int = 32
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    max_retries: int = 2
    min_caption_words: int = 5
    max_caption_words: int = 40
    min_text_words: int = 2
    max_text_words: int = 25
    dedup_threshold: float = 0.8
    taxonomy: Taxonomy = field(default_factory=Taxonomy)

    def __post_init__(self) -> None:
        check_backend(self.backend, "prompts.backend")
        if not 2 <= self.group_size <= 9:
            raise ValueError(f"prompts.group_size is the panels per group, 2 to 9 (a 3x3 grid), got {self.group_size}")


GRID_TEMPLATE = (
    "A grid of {n_panels} photographs ({layout}) of the same scene with the same subject identity, style, "
    "lighting and camera, each showing a variation. {panels}"
)


@dataclass
class RenderConfig:
    """Stage 2: a text-to-image model renders each group as one composite grid of panels, split into images.

    Args:
        model: the default backend's ``DiffusionPipeline`` (a FLUX-class model renders the most consistent grids).
        backend: a registered ``RenderBackend`` instead of the default (``model``), or null.
        composite: render each group as ONE composite grid and split it (the paper's recipe); false renders every
            panel as its own image with its own seed (the ablation).
        image_size: side of each (square) panel in pixels; a composite is ``cols x rows`` panels
            (``backends.grid_shape``).
        border: fraction of a panel's side trimmed from every edge of each panel, to drop the dividers and frame
            that composite renders often draw.
        prompt_template: composite prompt (default backend), with ``{n_panels}``, ``{layout}`` (e.g. "2 rows of
            2") and ``{panels}`` (each caption after its position, e.g. "Top left: ...").
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free (or FLUX distilled) guidance.
        batch_size: prompts per pipeline call.
        keep_composite: also save the unsplit composite (for inspecting the split).
        cpu_offload: ``enable_model_cpu_offload`` for GPUs too small for the whole pipeline.
        call_kwargs: extra pipeline call arguments, e.g. ``{max_sequence_length: 512}`` for FLUX.
    """

    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="black-forest-labs/FLUX.1-dev"))
    backend: dict[str, Any] | None = None
    composite: bool = True
    image_size: int = 512
    border: float = 0.02
    prompt_template: str = GRID_TEMPLATE
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    batch_size: int = 4
    keep_composite: bool = False
    cpu_offload: bool = False
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_backend(self.backend, "render.backend")
        if self.image_size % 16:
            raise ValueError(f"render.image_size must be a multiple of 16 (latent patching), got {self.image_size}")
        if not 0 <= self.border < 0.25:
            raise ValueError(f"render.border is a fraction of a panel's side in [0, 0.25), got {self.border}")
        _check_template(self.prompt_template, {"n_panels", "layout", "panels"}, "render.prompt_template")


@dataclass
class ImageCheckConfig:
    """Always-on check that each rendered panel is a readable, non-blank image.

    Args:
        min_std: smallest accepted standard deviation of pixel values (0-255); flat renders fall below it.
    """

    min_std: float = 4.0


@dataclass
class ClipFilterConfig:
    """CLIP-score filter of each (source, edit) pair. Similarities are cosines of L2-normalised CLIP embeddings.

    Args:
        model: the default backend's transformers ``CLIPModel`` (with its processor).
        backend: a registered ``ScorerBackend`` instead of the default (``model``), or null. The image-image
            and direction checks need a scorer that provides ``embeddings``; others skip them.
        batch_size: pairs per scorer call.
        min_caption_score: each image against its own caption.
        min_caption_margin: each image must match its own caption better than the other one by this much.
        min_pair_similarity: the images must share their elements (image-image similarity at least this).
        max_pair_similarity: ... but must not be near-duplicates (at most this).
        min_direction: cosine between the image change and the caption change (target minus reference).
    """

    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="openai/clip-vit-large-patch14"))
    backend: dict[str, Any] | None = None
    batch_size: int = 64
    min_caption_score: float = 0.2
    min_caption_margin: float = 0.0
    min_pair_similarity: float = 0.7
    max_pair_similarity: float = 0.97
    min_direction: float = 0.1

    def __post_init__(self) -> None:
        check_backend(self.backend, "filter.clip.backend")


JUDGE_QUESTION = "Are the two images the same scene with only this change from left to right: {text}?"


@dataclass
class JudgeConfig:
    """Judge of each (source, edit) pair: is the edit the source changed as the forward text says?

    Args:
        model: the default backend's image-text-to-text model (``AutoModelForImageTextToText``, chat template).
        backend: a registered ``JudgeBackend`` instead of the default (``model``), or null.
        batch_size: pairs per judge call.
        question: the default backend's yes/no question, with ``{text}``; the pair is shown side by side and the
            score is P(yes) / (P(yes) + P(no)) of the first answer token.
        both_directions: also judge the edit -> source change with the backward text (the score is the lower).
        min_yes_probability: the score must be at least this.
    """

    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="Qwen/Qwen2.5-VL-7B-Instruct"))
    backend: dict[str, Any] | None = None
    batch_size: int = 16
    question: str = JUDGE_QUESTION
    both_directions: bool = False
    min_yes_probability: float = 0.5

    def __post_init__(self) -> None:
        check_backend(self.backend, "filter.judge.backend")
        _check_template(self.question, {"text"}, "judge.question")


@dataclass
class FilterConfig:
    """Stage 3: filters score every rendered pair; thresholds are applied afterwards, so changing one needs no
    recomputation. Filters run as a cascade, cheapest first, each only on pairs that passed the previous ones.

    Args:
        batch_size: pairs per block (each filter then batches the pairs that reach it by its own batch_size).
        image_check: readability and blankness check (always on).
        clip: CLIP-score filter, or null to disable it.
        judge: multimodal-LLM judge, or null to disable it.
    """

    batch_size: int = 64
    image_check: ImageCheckConfig = field(default_factory=ImageCheckConfig)
    clip: ClipFilterConfig | None = field(default_factory=ClipFilterConfig)
    judge: JudgeConfig | None = field(default_factory=JudgeConfig)


@dataclass
class AssembleConfig:
    """Stage 4: each group's triplets (source <-> edits, edit -> edit), the split, dataset card and preview.

    Args:
        val_fraction: fraction of groups (never split across train and val) in the validation split.
        preview_groups: groups drawn in ``preview.png`` (one row of panels each).
        pretty_name: dataset name in the card.
        link_images: hard-link the kept images into ``OUT/images`` (falls back to copying across file systems).
        parquet_shard_mb: most megabytes of images and texts per parquet shard of ``OUT/data`` (the Hub's
            format, one row per group; needs ``pip install "coalign[hub]"``, else the shards are skipped with a
            warning).
    """

    val_fraction: float = 0.01
    preview_groups: int = 8
    pretty_name: str = "CIRHS-style synthetic CIR triplets"
    link_images: bool = True
    parquet_shard_mb: float = 256.0


@dataclass
class SynthesisConfig:
    """The whole CIRHS pipeline: prompts -> render -> filter -> assemble.

    Args:
        seed: global seed; every item's sampling seed derives from it and the item id.
        shard_size: items per shard (one folder per shard and stage; ranks take whole shards).
        prompts: stage 1.
        render: stage 2.
        filter: stage 3.
        assemble: stage 4.
    """

    seed: int = 0
    shard_size: int = 1000
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)


def _check_template(template: str, allowed: set[str], where: str) -> None:
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if unknown := names - allowed:
        raise ValueError(f"{where} uses unknown placeholders {sorted(unknown)}; allowed: {sorted(allowed)}")


# Fields that change how fast a stage runs but not what it writes; they may differ between a run and its resume.
_VOLATILE = {"batch_size", "num_groups", "cpu_offload", "dtype", "dedup_threshold"}


def fingerprint(section: Any, **extra: Any) -> dict[str, Any]:
    """The settings of a stage that determine its outputs, to refuse resuming with different ones.

    ``dedup_threshold`` is applied when the prompts are merged, so it may change freely, like the speed knobs.
    """

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in _VOLATILE}
        return obj

    return {**strip(dataclasses.asdict(section)), **extra}
