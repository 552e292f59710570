"""BLIP-2 backbone: EVA ViT-g image encoder + Q-Former, composing inside the Q-Former (as SPRC and BLIP4CIR do).

Built from the parts of transformers' ``Blip2ForImageTextRetrieval``; :func:`blip2_state_dict_from_hf` maps that
model's weights (e.g. ``Salesforce/blip2-itm-vit-g``) onto this backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
)
from .base import Backbone, ImageConfig

__all__ = ["Blip2Backbone", "BLIP2_ARCHITECTURES", "blip2_state_dict_from_hf"]


def _blip2_architecture(image_size: int) -> dict[str, Any]:
    """Blip2Config kwargs of the LAVIS stage-1 retrieval checkpoints as transformers converted them."""
    return {
        # EVA ViT-g/14 (the last of its 40 blocks is dropped, as in BLIP-2).
        "vision_config": {
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": image_size,
            "patch_size": 14,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
        },
        # BERT-base Q-Former, cross-attention every 2nd layer; the vocabulary has BERT's 30522 tokens + [DEC].
        "qformer_config": {
            "vocab_size": 30523,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 512,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": 1408,
            "use_qformer_text_input": True,
        },
        "num_query_tokens": 32,
        "image_text_hidden_size": 256,
    }


# Embedded so that building a backbone by name never downloads a config.json.
BLIP2_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Salesforce/blip2-itm-vit-g": _blip2_architecture(224),
    "Salesforce/blip2-itm-vit-g-coco": _blip2_architecture(364),
}

# transformers' Blip2ForImageTextRetrieval name -> this backbone's name (LAVIS/SPRC spelling).
_HF_RENAMES = {"vision_projection.": "vision_proj.", "text_projection.": "text_proj."}
_HF_UNUSED = ("itm_head.",)  # the image-text matching head is not part of retrieval by embeddings


def blip2_state_dict_from_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a ``Blip2ForImageTextRetrieval`` state dict onto :class:`Blip2Backbone` (drops the ITM head)."""
    mapped = {}
    for key, value in state_dict.items():
        if key.startswith(_HF_UNUSED):
            continue
        for old, new in _HF_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        mapped[key] = value
    return mapped


def _autocast_once(image: Tensor) -> Tensor:
    """Under autocast, the ViT features in the autocast dtype, cast once: every cross-attention layer's key and value
    projections would cast them again, and each copy would be kept for the backward (6 layers x 2 copies of
    ``[B, 257, 1408]``). The same numbers either way: autocast casts a linear layer's input to that dtype."""
    device = image.device.type
    if device in ("cuda", "cpu", "xpu") and image.is_floating_point() and torch.is_autocast_enabled(device):
        return image.to(torch.get_autocast_dtype(device))
    return image


@register_component
class Blip2Backbone(ProcessorConfigMixin, FrozenModulesMixin, HFTokenizerMixin, Backbone):
    """BLIP-2 (EVA ViT-g + Q-Former) as the paper's CoAlign backbone.

    With ``V(x)`` the ViT features of image x, ``Q`` the ``N_q`` learned query tokens (32), ``T`` the embedded
    modification-text tokens and ``QF(seq; V)`` the Q-Former in which only the query tokens cross-attend to ``V``::

        [h_q ; h_t]      = QF([Q ; T]; V(ref))          # multimodal pass, query and text attend to each other
        query.embedding  = normalize(text_proj(h_t[0]))                         [B, 256]   (h_t[0]: the [CLS])
        query.tokens     = normalize(vision_proj(h_q))                          [B, N_q, 256]
        g                = QF(Q; V(target))             # the image-only pass of BLIP-2's ITC
        target.embedding = target.tokens = normalize(vision_proj(g))            [B, N_q, 256]

    A query scores a target by ``max_k <query.embedding, target.embedding[k]>``, BLIP-2's image-text contrastive
    score. The query tokens are the fused Q-Former query outputs: they have seen the reference image and the text,
    and live in the same ``vision_proj`` space as the target tokens, so the local head compares like with like.

    Args:
        model_name: a BLIP-2 retrieval checkpoint (architecture embedded in code) or, with ``config``, any
            label/path; ``load_pretrained`` reads ``Blip2ForImageTextRetrieval`` weights from it.
        config: ``Blip2Config`` kwargs (``vision_config``, ``qformer_config``, ``num_query_tokens``,
            ``image_text_hidden_size``); the Q-Former always gets ``use_qformer_text_input=True``.
        freeze_image_encoder: freeze the ViT (BLIP-2 and SPRC keep it frozen; it is 1B parameters).
        tokenizer: hub id or local folder of the BERT tokenizer; None means ``model_name``.
        max_length: texts are padded/truncated to this many tokens (BLIP-2 uses 32 for retrieval).
        gradient_checkpointing: recompute the activations of the trainable towers (the Q-Former, and the ViT
            when it is not frozen) in the backward pass instead of keeping them: less memory, about a third more
            compute for those towers.

    The frozen ViT is the backbone's image stem (:meth:`encode_image_stem`, ``[B, 1 + P, D_vit]``), the part
    ``CoAlign(feature_cache=...)`` computes once per image.

    Raises:
        ValueError: unknown ``model_name`` without ``config``, a config that disables the Q-Former's text input,
            or ``max_length`` beyond the Q-Former's positions.
    """

    def __init__(
        self,
        model_name: str = "Salesforce/blip2-itm-vit-g",
        config: dict[str, Any] | None = None,
        freeze_image_encoder: bool = True,
        tokenizer: str | None = None,
        max_length: int = 32,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        # transformers' model classes cost seconds to import: only when this backbone is built
        from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

        # transformers' model classes cost seconds to import: only when this backbone is built
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if config is None:
            if model_name not in BLIP2_ARCHITECTURES:
                raise ValueError(
                    f"unknown BLIP-2 checkpoint {model_name!r}: known ones are {sorted(BLIP2_ARCHITECTURES)}; for "
                    "any other pass `config=` (Blip2Config kwargs)"
                )
            config = BLIP2_ARCHITECTURES[model_name]
        config = copy.deepcopy(config)
        qformer_kwargs = dict(config.get("qformer_config") or {})
        if qformer_kwargs.get("use_qformer_text_input") is False:
            raise ValueError("Blip2Backbone needs qformer_config['use_qformer_text_input']=True (the text path)")
        qformer_kwargs["use_qformer_text_input"] = True
        blip_config = Blip2Config(**{**config, "qformer_config": qformer_kwargs})
        qconfig = blip_config.qformer_config
        if not 1 <= max_length <= qconfig.max_position_embeddings:
            raise ValueError(f"max_length must be in [1, {qconfig.max_position_embeddings}], got {max_length}")

        self.model_name = model_name
        self.tokenizer_source = tokenizer or model_name
        self.max_length = max_length
        self.num_query_tokens = blip_config.num_query_tokens
        self.embed_dim = self.token_dim = blip_config.image_text_hidden_size
        self._image_size = blip_config.vision_config.image_size

        self.vision_model = Blip2VisionModel(blip_config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, self.num_query_tokens, qconfig.hidden_size))
        self.embeddings = Blip2TextEmbeddings(qconfig)
        self.qformer = Blip2QFormerModel(qconfig)
        self.vision_proj = nn.Linear(qconfig.hidden_size, self.embed_dim)
        self.text_proj = nn.Linear(qconfig.hidden_size, self.embed_dim)
        self._init_own_weights(qconfig.initializer_range)

        if freeze_image_encoder:
            self.freeze_modules(["vision_model"])
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            trainable = [self.qformer] + ([] if freeze_image_encoder else [self.vision_model])
            enable_gradient_checkpointing(trainable)

    def _init_own_weights(self, std: float) -> None:
        # BERT-style init as LAVIS does. Not zeros for the query tokens (transformers' choice, overwritten by
        # checkpoints there): identical query tokens would give 32 identical outputs, a dead start for training.
        nn.init.normal_(self.query_tokens, std=std)
        for embedding in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
            nn.init.normal_(embedding.weight, std=std)
        if self.embeddings.word_embeddings.padding_idx is not None:
            nn.init.zeros_(self.embeddings.word_embeddings.weight[self.embeddings.word_embeddings.padding_idx])
        for linear in (self.vision_proj, self.text_proj):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def _own_image_config(self) -> ImageConfig:
        """BlipImageProcessor's settings: straight to the tower's size (no crop), bicubic, OpenAI CLIP mean/std.

        (``image_config`` adds a checkpoint's ``preprocessor_config.json``: :class:`ProcessorConfigMixin`.)
        """
        return ImageConfig(
            size=self._image_size, mean=list(CLIP_MEAN), std=list(CLIP_STD), resample="bicubic", resize_mode="square"
        )

    # --- encoders -------------------------------------------------------------------------------------
    def image_stem_modules(self) -> list[str]:
        return ["vision_model"]

    def encode_image_stem(self, pixel_values: Tensor) -> Tensor:
        """The ViT's last hidden state ``[B, 1 + P, D_vit]`` (after its post-layernorm)."""
        check_images(pixel_values, self._image_size, "Blip2Backbone.encode_image_stem")
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def encode_query(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        check_query_inputs(pixel_values, input_ids, attention_mask, self._image_size, "Blip2Backbone.encode_query")
        return self.encode_query_from_stem(self.encode_image_stem(pixel_values), input_ids, attention_mask)

    def encode_query_from_stem(self, stem: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        image = _autocast_once(stem)
        if image.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Blip2Backbone: {image.shape[0]} reference images but {input_ids.shape[0]} texts")
        n, b = self.num_query_tokens, image.shape[0]
        query = self.query_tokens.expand(b, -1, -1)
        sequence = self.embeddings(input_ids=input_ids, query_embeds=query)  # [B, N_q + L, H]
        query_mask = torch.ones(b, n, dtype=attention_mask.dtype, device=attention_mask.device)
        hidden = self.qformer(
            query_embeds=sequence,
            query_length=n,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image,
        ).last_hidden_state
        embedding = F.normalize(self.text_proj(hidden[:, n]), dim=-1)
        tokens = F.normalize(self.vision_proj(hidden[:, :n]), dim=-1)
        return QueryFeatures(embedding=embedding, tokens=tokens, token_mask=None)

    def encode_target(self, pixel_values: Tensor) -> TargetFeatures:
        check_images(pixel_values, self._image_size, "Blip2Backbone.encode_target")
        return self.encode_target_from_stem(self.encode_image_stem(pixel_values))

    def encode_target_from_stem(self, stem: Tensor) -> TargetFeatures:
        image = _autocast_once(stem)
        query = self.query_tokens.expand(image.shape[0], -1, -1)
        hidden = self.qformer(query_embeds=query, encoder_hidden_states=image).last_hidden_state
        tokens = F.normalize(self.vision_proj(hidden), dim=-1)
        return TargetFeatures(embedding=tokens, tokens=tokens)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """BLIP-2's ITC text embedding ``normalize(text_proj(QF(T)[CLS]))`` ``[B, 256]``, without any image."""
        sequence = self.embeddings(input_ids=input_ids)
        hidden = self.qformer(query_embeds=sequence, query_length=0, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    # --- weights --------------------------------------------------------------------------------------
    def load_hf_state_dict(self, state_dict: Mapping[str, Tensor], source: str = "Blip2ForImageTextRetrieval") -> None:
        """Load weights of a transformers ``Blip2ForImageTextRetrieval`` (strict, after renaming)."""
        load_weights(self, blip2_state_dict_from_hf(state_dict), source)

    def load_pretrained(self) -> None:
        """Load ``Blip2ForImageTextRetrieval.from_pretrained(model_name)`` weights (hub id or local folder).

        A local folder's ``preprocessor_config.json`` sets :attr:`image_config` (size, mean, std, resampling).
        """
        self.read_processor_config(self.model_name)
        # transformers' model classes cost seconds to import: only when this backbone is built
        from transformers import Blip2ForImageTextRetrieval

        hf_model = load_hf_model(Blip2ForImageTextRetrieval, self.model_name, like=self)
        self.load_hf_state_dict(hf_model.state_dict(), f"Blip2ForImageTextRetrieval {self.model_name!r}")
