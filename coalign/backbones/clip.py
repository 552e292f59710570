"""CLIP backbone: two towers (OpenAI CLIP from transformers) and a composer that fuses them.

Shapes, with E the CLIP projection width (512 for ViT-B, 768 for ViT-L), P the number of image patches and L the
tokenizer's ``max_length``:

* query:  ``embedding [B, E]``, ``tokens [B, P + L, E]`` with ``token_mask [B, P + L]``
* target: ``embedding [B, 1, E]``, ``tokens [B, P, E]``
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._features import QueryFeatures, TargetFeatures
from ..registry import register_component
from ._hf import (
    CLIP_MEAN,
    CLIP_STD,
    FrozenModulesMixin,
    HFTokenizerMixin,
    ProcessorConfigMixin,
    check_images,
    check_query_inputs,
    enable_gradient_checkpointing,
    load_hf_model,
    load_weights,
    two_tower_query,
    two_tower_target,
)
from .base import Backbone, ImageConfig
from .composers import Combiner, Composer

__all__ = ["CLIPBackbone", "CLIP_ARCHITECTURES"]


def _clip_architecture(
    projection_dim: int, text_width: int, text_heads: int, vision_width: int, vision_layers: int, vision_heads: int,
    patch_size: int, image_size: int = 224,
) -> dict[str, Any]:  # fmt: skip
    """CLIPConfig kwargs of an OpenAI checkpoint (MLP width 4x, quick_gelu, 12-layer 77-token text tower)."""
    return {
        "projection_dim": projection_dim,
        "text_config": {
            "vocab_size": 49408,
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": 12,
            "num_attention_heads": text_heads,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": projection_dim,
            # 49407 is <|endoftext|>: pooling picks the first EOS token (the padding token is EOS too).
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": "quick_gelu",
            "projection_dim": projection_dim,
        },
    }


# Embedded so that building a backbone by name never downloads a config.json.
CLIP_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "openai/clip-vit-base-patch32": _clip_architecture(512, 512, 8, 768, 12, 12, patch_size=32),
    "openai/clip-vit-base-patch16": _clip_architecture(512, 512, 8, 768, 12, 12, patch_size=16),
    "openai/clip-vit-large-patch14": _clip_architecture(768, 768, 12, 1024, 24, 16, patch_size=14),
    "openai/clip-vit-large-patch14-336": _clip_architecture(768, 768, 12, 1024, 24, 16, patch_size=14, image_size=336),
}


@register_component
class CLIPBackbone(ProcessorConfigMixin, FrozenModulesMixin, HFTokenizerMixin, Backbone):
    """OpenAI CLIP image and text towers with a composer (CLIP4Cir-style).

    With ``f_I`` = ``visual_projection(post_layernorm(CLS))`` and ``f_T`` = ``text_projection(EOS state)``::

        query.embedding  = normalize(composer(normalize(f_I(ref)), normalize(f_T(text))))    [B, E]
        query.tokens     = [normalize(visual_projection(post_layernorm(ref patches)));
                            normalize(text_projection(text hidden states))]                  [B, P + L, E]
        target.embedding = normalize(f_I(target))                                            [B, 1, E]
        target.tokens    = normalize(visual_projection(post_layernorm(target patches)))      [B, P, E]

    The query tokens hold *both* sources because a composed query is "the reference, changed as the text says":
    the local head must be able to match kept content against the reference's patches and changed content
    against the text's words. CLIP fuses the two only in the global composer, so there are no fused local tokens;
    padding text positions are masked out. Patch tokens go through the same ``post_layernorm`` and
    ``visual_projection`` as CLS so that local and global features share the joint space. The composer gets unit
    vectors so that neither tower dominates by norm (which matters for :class:`SumComposer`).

    Args:
        model_name: an ``openai/clip-*`` hub id (architecture embedded in code) or, with ``config``, any label/path;
            ``load_pretrained`` reads weights from it.
        config: ``CLIPConfig`` kwargs; when given, the towers are built from it (how tests build tiny models).
        composer: fuses image and text features; None builds CLIP4Cir's Combiner with its width ratios
            (projection 4E, hidden 8E, as 2560/5120 for E = 640 in the paper).
        freeze_image_encoder: freeze the vision tower and ``visual_projection`` (then the target space is fixed).
        freeze_text_encoder: freeze the text tower and ``text_projection``.
        tokenizer: hub id or local folder of the tokenizer; None means ``model_name``.
        max_length: texts are padded/truncated to this many tokens (at most the text tower's 77 positions).
        gradient_checkpointing: recompute the activations of the towers that train (not frozen) in the backward
            pass instead of keeping them: less memory, about a third more compute for those towers.

    With ``freeze_image_encoder`` the vision tower and ``visual_projection`` are the backbone's image stem
    (:meth:`encode_image_stem`, the projected ``[B, 1 + P, E]`` tokens), which ``CoAlign(feature_cache=...)``
    computes once per image.

    Raises:
        ValueError: unknown ``model_name`` without ``config``, or ``max_length`` beyond the text positions.
    """

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch32",
        config: dict[str, Any] | None = None,
        composer: Composer | None = None,
        freeze_image_encoder: bool = False,
        freeze_text_encoder: bool = False,
        tokenizer: str | None = None,
        max_length: int = 77,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        # transformers' model classes cost seconds to import: only when this backbone is built
        from transformers import CLIPConfig, CLIPTextModel, CLIPVisionModel

        if config is None:
            if model_name not in CLIP_ARCHITECTURES:
                raise ValueError(
                    f"unknown CLIP checkpoint {model_name!r}: known ones are {sorted(CLIP_ARCHITECTURES)}; for any "
                    "other pass `config=` (CLIPConfig kwargs, e.g. CLIPConfig.from_pretrained(name).to_dict())"
                )
            config = CLIP_ARCHITECTURES[model_name]
        clip_config = CLIPConfig(**copy.deepcopy(config))
        text_positions = clip_config.text_config.max_position_embeddings
        if not 1 <= max_length <= text_positions:
            raise ValueError(f"max_length must be in [1, {text_positions}] (text positions), got {max_length}")

        self.model_name = model_name
        self.tokenizer_source = tokenizer or model_name
        self.max_length = max_length
        self.embed_dim = self.token_dim = clip_config.projection_dim
        self._image_size = clip_config.vision_config.image_size

        # Same attribute names as transformers' CLIPModel, so its state dict loads as is (minus logit_scale).
        self.text_model = CLIPTextModel(clip_config.text_config)
        self.vision_model = CLIPVisionModel(clip_config.vision_config)
        self.visual_projection = torch.nn.Linear(clip_config.vision_config.hidden_size, self.embed_dim, bias=False)
        self.text_projection = torch.nn.Linear(clip_config.text_config.hidden_size, self.embed_dim, bias=False)
        # CLIP's own initialisation of the projections (transformers' CLIPPreTrainedModel._init_weights).
        factor = clip_config.initializer_factor
        torch.nn.init.normal_(self.visual_projection.weight, std=factor * clip_config.vision_config.hidden_size**-0.5)
        torch.nn.init.normal_(self.text_projection.weight, std=factor * clip_config.text_config.hidden_size**-0.5)
        e = self.embed_dim
        self.composer = composer if composer is not None else Combiner(dim=e, projection_dim=4 * e, hidden_dim=8 * e)

        if freeze_image_encoder:
            self.freeze_modules(["vision_model", "visual_projection"])
        if freeze_text_encoder:
            self.freeze_modules(["text_model", "text_projection"])
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            towers = [(self.vision_model, freeze_image_encoder), (self.text_model, freeze_text_encoder)]
            enable_gradient_checkpointing([tower for tower, frozen in towers if not frozen])

    def _own_image_config(self) -> ImageConfig:
        """CLIPImageProcessor's settings: shortest edge to the tower's size, bicubic, centre crop, OpenAI CLIP mean/std.

        (``image_config`` adds a checkpoint's ``preprocessor_config.json``: :class:`ProcessorConfigMixin`.)
        """
        return ImageConfig(
            size=self._image_size,
            mean=list(CLIP_MEAN),
            std=list(CLIP_STD),
            resample="bicubic",
            resize_mode="shortest_edge",
        )

    # --- encoders -------------------------------------------------------------------------------------
    def image_stem_modules(self) -> list[str]:
        return ["vision_model", "visual_projection"]

    def encode_image_stem(self, pixel_values: Tensor) -> Tensor:
        """The projected, not normalised image tokens ``[B, 1 + P, E]`` (CLS first, then the patches)."""
        check_images(pixel_values, self._image_size, "CLIPBackbone.encode_image_stem")
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, D] before post-LN
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled EOS feature [B, E], token features [B, L, E])``, projected and not normalised."""
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(out.pooler_output), self.text_projection(out.last_hidden_state)

    def encode_query(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        check_query_inputs(pixel_values, input_ids, attention_mask, self._image_size, "CLIPBackbone.encode_query")
        return self.encode_query_from_stem(self.encode_image_stem(pixel_values), input_ids, attention_mask)

    def encode_query_from_stem(self, stem: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        if stem.shape[0] != input_ids.shape[0]:
            raise ValueError(f"CLIPBackbone: {stem.shape[0]} reference images but {input_ids.shape[0]} texts")
        image, patches = stem[:, 0], stem[:, 1:]
        text, words = self._encode_text(input_ids, attention_mask)
        return two_tower_query(self.composer, image, patches, text, words, attention_mask)

    def encode_target(self, pixel_values: Tensor) -> TargetFeatures:
        check_images(pixel_values, self._image_size, "CLIPBackbone.encode_target")
        return self.encode_target_from_stem(self.encode_image_stem(pixel_values))

    def encode_target_from_stem(self, stem: Tensor) -> TargetFeatures:
        image, patches = stem[:, 0], stem[:, 1:]
        return two_tower_target(image, patches)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised CLIP text embeddings ``[B, E]`` (text-only baselines, zero-shot text-to-image search)."""
        return F.normalize(self._encode_text(input_ids, attention_mask)[0], dim=-1)

    # --- weights --------------------------------------------------------------------------------------
    def load_pretrained(self) -> None:
        """Load the CLIP towers from ``CLIPModel.from_pretrained(model_name)`` (hub id or local folder).

        The composer keeps its own initialisation: CLIP has no composer to load. A local folder's
        ``preprocessor_config.json`` sets :attr:`image_config` (size, mean, std, resampling).
        """
        self.read_processor_config(self.model_name)
        # transformers' model classes cost seconds to import: only when this backbone is built
        from transformers import CLIPModel

        hf_model = load_hf_model(CLIPModel, self.model_name, like=self)
        state = {k: v for k, v in hf_model.state_dict().items() if k != "logit_scale"}
        state.update({f"composer.{k}": v for k, v in self.composer.state_dict().items()})
        load_weights(self, state, f"CLIPModel {self.model_name!r}")
