"""``create_model`` and the registered model configurations (timm-style ``arch_tag`` names)."""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ._hub import read_config, resolve_checkpoint_folder
from .backbones.base import Backbone
from .backbones.blip2 import Blip2Backbone
from .backbones.clip import CLIPBackbone
from .backbones.tiny import TinyBackbone
from .heads.global_alignment import ContextualAlignmentHead
from .heads.local_reasoning import TokenReasoningHead
from .model import CoAlign
from .registry import get_model_fn, list_models, register_model

__all__ = ["create_model", "list_models", "load_model", "architecture_of"]

#: the CoAlign arguments a fine-tuning source fixes (``init_from``): its architecture and inference options
ARCHITECTURE_KEYS = ("backbone", "global_head", "local_head", "target_pad_ratio", "rerank_top_k", "rerank_weight")

_MODEL_ARGS = set(inspect.signature(CoAlign.__init__).parameters) - {"self", "backbone"}


def _split(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides naming a CoAlign argument go to the model; the rest go to the backbone."""
    model = {k: v for k, v in overrides.items() if k in _MODEL_ARGS}
    backbone = {k: v for k, v in overrides.items() if k not in _MODEL_ARGS}
    return model, backbone


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> CoAlign:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` (``"coalign_blip2_vitg"``, ``"coalign_tiny"``, ...).
        pretrained: load the backbone's published base weights (downloads them; the heads start fresh).
        overrides: CoAlign arguments (``rerank_top_k=50``, ``global_head=...``) or backbone arguments
            (``freeze_image_encoder=False``, ``tokenizer="path/or/hub-id"``).

    Example:
        >>> model = create_model("coalign_tiny")
        >>> model.backbone.image_config["size"]
        32
    """
    model = get_model_fn(name)(**overrides)
    if pretrained:
        model.backbone.load_pretrained()
    model.card_info.setdefault("name", name)
    return model


def load_model(source: str, random_init: bool | None = False, device: str | None = None) -> CoAlign:
    """A model from a registered name, a ``save_pretrained`` folder, a Lightning ``.ckpt`` file or a Hub id.

    This is the one loader behind every ``--model`` option (``coalign evaluate``, ``index``, ``search``).

    Args:
        source: a registered name (:func:`list_models`), a folder, a ``.ckpt`` file or a Hub id (``owner/name``).
        random_init: for a registered name only. False: load its published base weights (a name with none is
            an error); True: no base weights; None: the published weights when the name has them, else no base
            weights, with a warning. Without base weights the model is built under a fixed seed, so two commands
            that load the same name (``index`` then ``search``) get the same model.
        device: move the model there (None: leave it on the CPU).

    Raises:
        ValueError: ``source`` is none of the four, or a name has no published weights and ``random_init`` is False.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        model = CoAlign.from_pretrained(path)
    elif path.is_file() and path.suffix == ".ckpt":
        try:
            model = CoAlign.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError) as err:
            # torch's message for a file that is not a plain weights checkpoint advises weights_only=False, which
            # would run code from the file: never do that
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{path} is not a readable coalign Lightning checkpoint ({first[:200]}); checkpoints are loaded "
                "without unpickling code, so a truncated, corrupt or foreign file cannot be read"
            ) from None
    elif source in list_models():
        model = _named(source, random_init)
    elif source.count("/") == 1 and not path.exists():
        model = CoAlign.from_pretrained(source)
    else:
        raise ValueError(
            f"{source!r} is not a folder, a .ckpt file, a registered model ({', '.join(list_models())}) "
            "or a Hub id (owner/name)"
        )
    return model if device is None else model.to(device)


def architecture_of(source: str) -> dict[str, Any]:
    """The architecture a fine-tuning source fixes: ``{key: value}`` for :data:`ARCHITECTURE_KEYS`.

    ``coalign fit --model.init_from X`` builds X's own architecture with these (the YAML's model section supplies
    only what X does not fix: the optimizer, the schedule, the loss weights, a local head X lacks), so no model
    YAML has to be stacked to match X and no stale ``init_args`` of another backbone can leak in.

    Args:
        source: a registered name with published weights, a ``save_pretrained`` folder or a Hub id.

    Raises:
        ValueError: a registered name without published weights, or a source that is none of the three.
    """
    path = Path(source).expanduser()
    if path.is_dir() or (source.count("/") == 1 and not path.exists() and source not in list_models()):
        config = read_config(resolve_checkpoint_folder(source))["model"]
    elif source in list_models():
        with torch.device("meta"):  # the architecture only: no memory, no weights
            model = create_model(source)
        if type(model.backbone).load_pretrained is Backbone.load_pretrained:
            published = [n for n in list_models() if n != source and _has_weights(n)]
            raise ValueError(
                f"--model.init_from {source}: {source} has no published weights to start from; give a folder "
                f"written by save_pretrained, a Hub id, or one of {', '.join(published)}"
            )
        config = model.config()
    else:
        raise ValueError(
            f"--model.init_from {source!r} is not a folder, a registered model ({', '.join(list_models())}) "
            "or a Hub id (owner/name)"
        )
    return {key: config[key] for key in ARCHITECTURE_KEYS if key in config}


def _has_weights(name: str) -> bool:
    with torch.device("meta"):
        return type(create_model(name).backbone).load_pretrained is not Backbone.load_pretrained


def _named(name: str, random_init: bool | None) -> CoAlign:
    # a fixed seed: the untrained heads (and, without base weights, the whole model) are the same in every process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if random_init:
            return create_model(name)
        try:
            return create_model(name, pretrained=True)
        except NotImplementedError as err:
            if random_init is False:
                raise ValueError(
                    f"{name} has no published weights ({err}); random_init=True builds it untrained"
                ) from None
        torch.manual_seed(0)
        warnings.warn(f"{name} has no published weights: using a seeded random initialisation", stacklevel=3)
        return create_model(name)


def _build(backbone_cls, backbone_defaults: dict, model_defaults: dict, overrides: dict) -> CoAlign:
    model_kw, backbone_kw = _split(overrides)
    backbone = backbone_cls(**{**backbone_defaults, **backbone_kw})
    return CoAlign(backbone, **{**model_defaults, **model_kw})


@register_model
def coalign_tiny(**overrides: Any) -> CoAlign:
    """A tiny CNN + transformer model trained from scratch (no download): tests, laptops, the quickstart."""
    defaults = {
        "global_head": ContextualAlignmentHead(beta=0.1),
        "local_head": TokenReasoningHead(top_k=4),
        "local_loss_weight": 0.1,
    }
    return _build(TinyBackbone, {}, defaults, overrides)


def _clip(model_name: str, overrides: dict) -> CoAlign:

    defaults = {
        "global_head": ContextualAlignmentHead(beta=0.1),
        "local_head": TokenReasoningHead(top_k=8),
        "target_pad_ratio": 1.25,
    }
    return _build(CLIPBackbone, {"model_name": model_name}, defaults, overrides)


@register_model
def coalign_clip_vitb32(**overrides: Any) -> CoAlign:
    """CLIP ViT-B/32 towers composed by CLIP4Cir's Combiner (weights: openai/clip-vit-base-patch32)."""
    return _clip("openai/clip-vit-base-patch32", overrides)


@register_model
def coalign_clip_vitl14(**overrides: Any) -> CoAlign:
    """CLIP ViT-L/14 towers composed by CLIP4Cir's Combiner (weights: openai/clip-vit-large-patch14)."""
    return _clip("openai/clip-vit-large-patch14", overrides)


@register_model
def coalign_blip2_vitg(**overrides: Any) -> CoAlign:
    """The paper's configuration: BLIP-2 EVA ViT-g (frozen) + Q-Former (weights: Salesforce/blip2-itm-vit-g)."""

    defaults = {
        "global_head": ContextualAlignmentHead(beta=0.1),
        "local_head": TokenReasoningHead(top_k=8),
        "target_pad_ratio": 1.25,
    }
    return _build(
        Blip2Backbone, {"model_name": "Salesforce/blip2-itm-vit-g", "freeze_image_encoder": True}, defaults, overrides
    )
