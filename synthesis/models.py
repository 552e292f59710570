"""Loading the models a stage needs: a hub id or local folder through ``from_pretrained``, or a tiny random one.

Every loader returns models in eval mode on the requested device. diffusers is imported only inside
:func:`load_diffusion_pipeline`: the core package installs without the ``synthesis`` extra.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch

from . import _tiny
from .config import ModelSpec

__all__ = ["resolve_dtype", "load_causal_lm", "load_clip", "load_judge", "load_diffusion_pipeline", "free_memory"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on accelerators and float32 on CPUs (where bf16 kernels are slower, not faster)."""
    if spec.dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[spec.dtype]


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return {"revision": spec.revision} if spec.revision else {}


def load_causal_lm(spec: ModelSpec, device: torch.device, extra_tokens: tuple[str, ...] = ()):
    """``(model, tokenizer)`` of a chat LLM. ``extra_tokens`` only shape the tiny model's word vocabulary."""
    # transformers model classes: heavy, imported only when the prompts stage loads its LLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.tiny:
        model, tok = _tiny.tiny_causal_lm(extra_tokens)
    else:
        tok = AutoTokenizer.from_pretrained(spec.name, **_hub_kwargs(spec))
        model = AutoModelForCausalLM.from_pretrained(spec.name, dtype=resolve_dtype(spec, device), **_hub_kwargs(spec))
        if tok.chat_template is None:
            raise ValueError(f"{spec.name} has no chat template: the prompts stage needs an instruction-tuned model")
    return model.to(device=device, dtype=resolve_dtype(spec, device)).eval(), tok


def load_clip(spec: ModelSpec, device: torch.device):
    """``(model, processor)`` of a transformers ``CLIPModel``."""
    # transformers model classes: heavy, imported only when the filter stage loads CLIP
    from transformers import AutoProcessor, CLIPModel

    if spec.tiny:
        model, processor = _tiny.tiny_clip()
    else:
        model = CLIPModel.from_pretrained(spec.name, dtype=resolve_dtype(spec, device), **_hub_kwargs(spec))
        processor = AutoProcessor.from_pretrained(spec.name, **_hub_kwargs(spec))
    return model.to(device=device, dtype=resolve_dtype(spec, device)).eval(), processor


def load_judge(spec: ModelSpec, device: torch.device):
    """``(model, processor)`` of an image-text-to-text model (``AutoModelForImageTextToText``)."""
    # transformers model classes: heavy, imported only when the filter stage loads its judge
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if spec.tiny:
        model, processor = _tiny.tiny_judge()
    else:
        dtype = resolve_dtype(spec, device)
        model = AutoModelForImageTextToText.from_pretrained(spec.name, dtype=dtype, **_hub_kwargs(spec))
        processor = AutoProcessor.from_pretrained(spec.name, **_hub_kwargs(spec))
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"judge {spec.describe()} has no chat template: use an instruction-tuned multimodal model")
    return model.to(device=device, dtype=resolve_dtype(spec, device)).eval(), processor


def load_diffusion_pipeline(spec: ModelSpec, device: torch.device, cpu_offload: bool = False):
    """Any diffusers ``DiffusionPipeline`` (FLUX, SD3, SDXL, ...), or a tiny Stable Diffusion one."""
    try:
        # diffusers: heavy optional dependency, needed by the render stage only
        from diffusers import DiffusionPipeline
    except ImportError as err:
        raise ImportError("the render stage needs diffusers: pip install 'coalign[synthesis]'") from err
    dtype = resolve_dtype(spec, device)
    if spec.tiny:
        pipe = _tiny.tiny_diffusion_pipeline()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; the old name works in every version we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(spec.name, torch_dtype=dtype, **_hub_kwargs(spec))
    if cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # the stage draws its own bar, per item rather than per step
    return pipe


def free_memory() -> None:
    """Return accelerator memory once a stage has dropped its models, before the next one loads its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
