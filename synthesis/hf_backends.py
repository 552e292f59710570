"""The default backends: Hugging Face models (transformers chat LLM, diffusers pipeline, CLIP, multimodal judge).

Each is a registered backend (:mod:`.backends`) built from a stage's ``model`` spec when the stage's ``backend`` is
null (:func:`chat_backend`, :func:`render_backend`, :func:`scorer_backend`, :func:`judge_backend`); naming one by
``class_path`` with explicit ``init_args`` works too. ``model`` accepts a :class:`.config.ModelSpec` or its dict
(``{name: ..., tiny: true}`` builds the tiny random model offline). Models load in ``setup`` and are dropped in
``teardown``; diffusers and the transformers model classes are imported only then (:mod:`.models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from . import models
from .backends import (
    ChatBackend,
    JudgeBackend,
    RenderBackend,
    ScorerBackend,
    build_backend,
    grid_shape,
    register_backend,
)
from .config import GRID_TEMPLATE, JUDGE_QUESTION, ClipFilterConfig, JudgeConfig, ModelSpec, PromptsConfig, RenderConfig
from .groups import group_pieces
from .llm import ChatLLM, JsonConstraint

__all__ = [
    "HFChatBackend",
    "DiffusersRenderBackend",
    "CLIPScorerBackend",
    "MLLMJudgeBackend",
    "chat_backend",
    "render_backend",
    "scorer_backend",
    "judge_backend",
    "grid_prompt",
    "side_by_side",
]


def _spec(model: ModelSpec | dict[str, Any]) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec(**model)


def _model_settings(spec: ModelSpec) -> dict[str, Any]:
    return {"model": spec.describe(), "revision": spec.revision}


@register_backend
class HFChatBackend(ChatBackend):
    """A transformers chat LLM (:class:`.llm.ChatLLM`), seeded per item, JSON-constrained to the group schema.

    Args:
        model: the causal LM.
        constrained: force the group JSON (``num_edits`` edits, and consecutive cross texts with ``cross``).
        max_new_tokens: answer budget.
        temperature: sampling temperature.
        top_p: nucleus mass.
        caption_words: ``(min, max)`` words of a caption (constrained decoding closes a string between them).
        text_words: ``(min, max)`` words of a modification text.
        cross: constrained answers carry edit ``i`` -> ``i + 1`` texts.
        num_edits: the edits per group this run asks for (shapes the tiny model's vocabulary only).
    """

    def __init__(
        self,
        model: ModelSpec | dict[str, Any],
        constrained: bool = True,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 0.95,
        caption_words: Sequence[int] = (5, 40),
        text_words: Sequence[int] = (2, 25),
        cross: bool = True,
        num_edits: int = 3,
    ) -> None:
        self.model = _spec(model)
        self.constrained, self.cross, self.num_edits = constrained, cross, num_edits
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.limits = {"caption": tuple(caption_words), "text": tuple(text_words)}
        self.llm: ChatLLM | None = None
        self._constraints: dict[int, JsonConstraint] = {}

    def setup(self, device: torch.device) -> None:
        pieces = tuple(group_pieces(self.num_edits, self.cross)[0])
        model, tok = models.load_causal_lm(self.model, device, extra_tokens=pieces)
        self.llm = ChatLLM(model, tok, self.max_new_tokens, self.temperature, self.top_p)

    def teardown(self) -> None:
        self.llm = None
        self._constraints.clear()
        models.free_memory()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **_model_settings(self.model), "constrained": self.constrained}

    def generate(
        self, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int], num_edits: int
    ) -> list[str]:
        if self.constrained and num_edits not in self._constraints:
            pieces, kinds = group_pieces(num_edits, self.cross)
            tok = self.llm.tokenizer
            limits = [self.limits[k] for k in kinds]
            self._constraints[num_edits] = JsonConstraint(tok, pieces, limits, tok.eos_token_id)
        self.llm.constraint = self._constraints.get(num_edits)
        return self.llm.generate(conversations, seeds)


def _position(k: int, rows: int, cols: int) -> str:
    names = {1: [""], 2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}
    cnames = {1: [""], 2: ["left", "right"], 3: ["left", "middle", "right"]}
    r, c = divmod(k, cols)
    if rows in names and cols in cnames:
        name = f"{names[rows][r]} {cnames[cols][c]}".strip()
        return "center" if name == "middle middle" else name
    return f"row {r + 1}, column {c + 1}"


def grid_prompt(template: str, captions: Sequence[str]) -> str:
    """The composite prompt for one group; a single caption is its own prompt (separately seeded renders)."""
    if len(captions) == 1:
        return captions[0]
    rows, cols = grid_shape(len(captions))
    panels = " ".join(f"{_position(k, rows, cols).capitalize()}: {c.rstrip(' .')}." for k, c in enumerate(captions))
    layout = f"{rows} row{'s' if rows > 1 else ''} of {cols}"
    return template.format(n_panels=len(captions), layout=layout, panels=panels)


@register_backend
class DiffusersRenderBackend(RenderBackend):
    """Any diffusers ``DiffusionPipeline``: one composite per group from :func:`grid_prompt`, seeded per group.

    Args:
        model: the pipeline.
        prompt_template: composite prompt with ``{n_panels}``, ``{layout}`` and ``{panels}``.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free (or FLUX distilled) guidance.
        cpu_offload: ``enable_model_cpu_offload`` for GPUs too small for the whole pipeline.
        call_kwargs: extra pipeline call arguments, e.g. ``{max_sequence_length: 512}`` for FLUX.
    """

    def __init__(
        self,
        model: ModelSpec | dict[str, Any],
        prompt_template: str = GRID_TEMPLATE,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        cpu_offload: bool = False,
        call_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = _spec(model)
        self.prompt_template = prompt_template
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.cpu_offload, self.call_kwargs = cpu_offload, dict(call_kwargs or {})
        self.pipe = None

    def setup(self, device: torch.device) -> None:
        self.pipe = models.load_diffusion_pipeline(self.model, device, self.cpu_offload)

    def teardown(self) -> None:
        self.pipe = None
        models.free_memory()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **_model_settings(self.model)}

    def render(self, panels: Sequence[Sequence[str]], seeds: Sequence[int], panel_size: int) -> list[Image.Image]:
        out: list[Image.Image | None] = [None] * len(panels)
        for n in sorted({len(p) for p in panels}):  # one pipeline call per composite size
            todo = [k for k, p in enumerate(panels) if len(p) == n]
            rows, cols = grid_shape(n)
            width, height = cols * panel_size, rows * panel_size
            images = self.pipe(
                prompt=[grid_prompt(self.prompt_template, panels[k]) for k in todo],
                height=height,
                width=width,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(seeds[k]) for k in todo],
                **self.call_kwargs,
            ).images
            if len(images) != len(todo) or any(im.size != (width, height) for im in images):
                got = sorted({im.size for im in images})
                raise RuntimeError(f"the pipeline returned {len(images)} images of sizes {got}, not {width}x{height}")
            for k, im in zip(todo, images, strict=True):
                out[k] = im
        return out


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; older versions a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_backend
class CLIPScorerBackend(ScorerBackend):
    """A transformers ``CLIPModel``: the score is the cosine of the image and caption embeddings.

    Args:
        model: the CLIP model (with its processor).
    """

    def __init__(self, model: ModelSpec | dict[str, Any]) -> None:
        self.model = _spec(model)
        self.clip = self.processor = None

    def setup(self, device: torch.device) -> None:
        self.clip, self.processor = models.load_clip(self.model, device)

    def teardown(self) -> None:
        self.clip = self.processor = None
        models.free_memory()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **_model_settings(self.model)}

    @torch.inference_mode()
    def embeddings(self, images: Sequence[Image.Image], captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = self.clip.device, self.clip.dtype
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, dtype)
        tokens = self.processor(text=list(captions), return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(device) for k, v in tokens.items()}
        image = _features(self.clip.get_image_features(pixel_values=pixels))
        return image.float().cpu(), _features(self.clip.get_text_features(**tokens)).float().cpu()

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        image, text = self.embeddings(images, captions)
        return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).tolist()


def side_by_side(left: Image.Image, right: Image.Image, gap: float = 0.08) -> Image.Image:
    """Both images at the height of the taller one, with a white gap of ``gap`` times that height."""
    height = max(left.height, right.height)
    left = left.resize((round(left.width * height / left.height), height))
    right = right.resize((round(right.width * height / right.height), height))
    space = round(gap * height)
    canvas = Image.new("RGB", (left.width + space + right.width, height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + space, 0))
    return canvas


def _first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = set()
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded and encoded[0] != tokenizer.unk_token_id:
            ids.add(encoded[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer cannot spell any of {list(words)}")
    return sorted(ids)


@register_backend
class MLLMJudgeBackend(JudgeBackend):
    """An image-text-to-text model asked one yes/no question about the pair, shown side by side.

    The score is ``P(yes) / (P(yes) + P(no))`` of the first answer token (summing "Yes"/"yes"/" Yes"/" yes", and
    likewise for no): one forward pass, a calibrated number, no parsing of generated text.

    Args:
        model: the multimodal model (``AutoModelForImageTextToText`` with a chat template).
        question: the question, with ``{text}`` for the modification text; " Answer yes or no." is appended.
    """

    def __init__(self, model: ModelSpec | dict[str, Any], question: str = JUDGE_QUESTION) -> None:
        self.model = _spec(model)
        self.question = question
        self.mllm = self.processor = None

    def setup(self, device: torch.device) -> None:
        self.mllm, self.processor = models.load_judge(self.model, device)
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # the answer's first token is then read at position -1 for every row
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.yes_ids = _first_token_ids(tok, ["Yes", "yes", " Yes", " yes"])
        self.no_ids = _first_token_ids(tok, ["No", "no", " No", " no"])

    def teardown(self) -> None:
        self.mllm = self.processor = None
        models.free_memory()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **_model_settings(self.model), "question": self.question}

    @torch.inference_mode()
    def judge(
        self, references: Sequence[Image.Image], targets: Sequence[Image.Image], texts: Sequence[str]
    ) -> list[float]:
        images = [side_by_side(r, t) for r, t in zip(references, targets, strict=True)]
        prompts = []
        for text in texts:
            content = [
                {"type": "image"},
                {"type": "text", "text": self.question.format(text=text) + " Answer yes or no."},
            ]
            messages = [{"role": "user", "content": content}]
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        device, dtype = self.mllm.device, self.mllm.dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        logits = self.mllm(**inputs).logits[:, -1].float()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).cpu().tolist()


# -- a stage's backend from its config -----------------------------------------------------------------------------
def chat_backend(cfg: PromptsConfig) -> ChatBackend:
    """``cfg.backend`` if set, else :class:`HFChatBackend` from ``cfg.llm`` and the generation fields."""
    if cfg.backend is not None:
        return build_backend(cfg.backend["class_path"], cfg.backend.get("init_args"), ChatBackend)
    return HFChatBackend(
        cfg.llm,
        constrained=cfg.constrained,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        caption_words=(cfg.min_caption_words, cfg.max_caption_words),
        text_words=(cfg.min_text_words, cfg.max_text_words),
        cross=cfg.cross,
        num_edits=cfg.group_size - 1,
    )


def render_backend(cfg: RenderConfig) -> RenderBackend:
    """``cfg.backend`` if set, else :class:`DiffusersRenderBackend` from ``cfg.model`` and the sampling fields."""
    if cfg.backend is not None:
        return build_backend(cfg.backend["class_path"], cfg.backend.get("init_args"), RenderBackend)
    return DiffusersRenderBackend(
        cfg.model,
        prompt_template=cfg.prompt_template,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        cpu_offload=cfg.cpu_offload,
        call_kwargs=cfg.call_kwargs,
    )


def scorer_backend(cfg: ClipFilterConfig) -> ScorerBackend:
    """``cfg.backend`` if set, else :class:`CLIPScorerBackend` from ``cfg.model``."""
    if cfg.backend is not None:
        return build_backend(cfg.backend["class_path"], cfg.backend.get("init_args"), ScorerBackend)
    return CLIPScorerBackend(cfg.model)


def judge_backend(cfg: JudgeConfig) -> JudgeBackend:
    """``cfg.backend`` if set, else :class:`MLLMJudgeBackend` from ``cfg.model`` and ``cfg.question``."""
    if cfg.backend is not None:
        return build_backend(cfg.backend["class_path"], cfg.backend.get("init_args"), JudgeBackend)
    return MLLMJudgeBackend(cfg.model, question=cfg.question)
