"""timm backbone: any timm image model as the image tower, a transformers text encoder, a composer.

Shapes, with E = ``embed_dim``, C the timm model's feature width, N its number of image tokens (ViT patches without
the class/register tokens, or the ``H' x W'`` cells of a CNN's last feature map) and L the tokenizer's
``max_length``:

* query:  ``embedding [B, E]``, ``tokens [B, N + L, E]`` with ``token_mask [B, N + L]``
* target: ``embedding [B, 1, E]``, ``tokens [B, N, E]``
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from .._features import QueryFeatures, TargetFeatures
from ..registry import register_component
from ._hf import (
    FrozenModulesMixin,
    HFTokenizerMixin,
    check_images,
    check_query_inputs,
    load_hf_model,
    load_weights,
    two_tower_query,
    two_tower_target,
)
from .base import Backbone, ImageConfig
from .composers import Combiner, Composer

__all__ = ["TimmBackbone"]

_POOLINGS = ("mean", "cls")


def _square_size(value: Any, where: str) -> int:
    """An int side from an int or an ``(H, W)`` / ``(3, H, W)`` size; a non-square size is an error."""
    if isinstance(value, int):
        return value
    sides = [int(v) for v in value][-2:]
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ValueError(f"{where}: only square images are supported, got size {tuple(value)}")
    return sides[0]


@register_component
class TimmBackbone(FrozenModulesMixin, HFTokenizerMixin, Backbone):
    """A timm image model and a transformers text encoder, fused by a composer (CLIP4Cir-style two towers).

    With ``x = image_model.forward_features(images)`` (``[B, prefix + N, C]`` for a ViT, ``[B, C, H', W']`` for a
    CNN), ``f_I = image_projection(image_model.forward_head(x, pre_logits=True))`` and ``f_T`` the
    ``text_projection`` of the text encoder's pooled output (masked mean or first token)::

        query.embedding  = normalize(composer(normalize(f_I(ref)), normalize(f_T(text))))       [B, E]
        query.tokens     = [normalize(token_projection(ref tokens)); normalize(text_projection(words))]
        target.embedding = normalize(f_I(target))                                               [B, 1, E]
        target.tokens    = normalize(token_projection(target tokens))                           [B, N, E]

    Args:
        image_model: a timm model name (``timm.list_models()``), e.g. ``vit_base_patch16_224``, ``resnet50``,
            ``convnext_tiny``; built with ``num_classes=0`` (no classifier).
        image_model_kwargs: more ``timm.create_model`` arguments (``{"img_size": 32, "depth": 1}`` for a tiny ViT).
        image_size: the input side in pixels; None: ``image_model_kwargs["img_size"]`` if given, else the size of
            the model's pretrained config (224 for most).
        image_weights: a local weights file (``.safetensors``, ``.bin``, ``.pth``) for :meth:`load_pretrained`;
            None: timm's own source (the Hugging Face Hub or its local cache).
        text_model: a transformers hub id or local folder of a text encoder (BERT, RoBERTa, MiniLM, ...);
            :meth:`load_pretrained` reads its weights, and without ``text_config`` its ``config.json`` is read.
        text_config: ``AutoConfig.for_model`` kwargs (with ``model_type``); when given the text tower is built from
            it, with no file read (how tests build tiny towers).
        text_pooling: ``"mean"`` (mean of the non-padding states, sentence-transformers style) or ``"cls"`` (the
            first token's state, BERT style).
        embed_dim: width E of the global embeddings and of the local tokens.
        composer: fuses image and text features; None builds a Combiner (projection 4E, hidden 8E).
        freeze_image: freeze the timm model (then the target space is fixed up to the trainable projection and
            its outputs can be cached by ``CoAlign(feature_cache=...)``).
        freeze_text: freeze the text encoder.
        tokenizer: hub id or local folder of the tokenizer; None means ``text_model``.
        max_length: texts are padded/truncated to this many tokens.

    Raises:
        ValueError: an unknown timm model name, a bad pooling, a non-square image size or ``max_length`` beyond the
            text tower's positions.
    """

    def __init__(
        self,
        image_model: str = "vit_base_patch16_224",
        image_model_kwargs: dict[str, Any] | None = None,
        image_size: int | None = None,
        image_weights: str | None = None,
        text_model: str = "sentence-transformers/all-MiniLM-L6-v2",
        text_config: dict[str, Any] | None = None,
        text_pooling: str = "mean",
        embed_dim: int = 512,
        composer: Composer | None = None,
        freeze_image: bool = False,
        freeze_text: bool = False,
        tokenizer: str | None = None,
        max_length: int = 32,
    ):
        super().__init__()
        # timm and transformers' model classes cost seconds to import: only when this backbone is built
        import timm
        from timm.data import resolve_model_data_config  # (timm, as above)
        from transformers import AutoConfig, AutoModel  # (transformers, as above)

        reserved = {"pretrained", "num_classes", "pretrained_cfg_overlay"} & set(image_model_kwargs or {})
        if reserved:
            raise ValueError(
                f"TimmBackbone: image_model_kwargs may not set {sorted(reserved)}: the backbone has no classifier "
                "and loads weights only in load_pretrained() (a local file through `image_weights=`)"
            )
        if text_pooling not in _POOLINGS:
            raise ValueError(f"text_pooling must be one of {_POOLINGS}, got {text_pooling!r}")
        if not timm.is_model(image_model):
            raise ValueError(
                f"unknown timm model {image_model!r}; see timm.list_models() (e.g. 'vit_base_patch16_224', "
                "'resnet50', 'convnext_tiny')"
            )
        self.image_model_name = image_model
        self.image_model_kwargs = copy.deepcopy(image_model_kwargs or {})
        self.image_weights = image_weights
        self.text_model_name = text_model
        self.text_pooling = text_pooling
        self.tokenizer_source = tokenizer or text_model
        self.max_length = max_length
        self.embed_dim = self.token_dim = embed_dim

        self.image_model = timm.create_model(image_model, pretrained=False, **self._timm_kwargs())
        data = resolve_model_data_config(self.image_model)
        if image_size is None:
            image_size = self.image_model_kwargs.get("img_size", data["input_size"])
        self._image_size = _square_size(image_size, f"TimmBackbone({image_model})")
        self._mean, self._std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
        # ImageTransform resamples with bicubic, bilinear or nearest; timm's rarer modes (lanczos, random) -> bicubic
        interpolation = str(data.get("interpolation", "bicubic"))
        self._resample = interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
        self._prefix_tokens = int(getattr(self.image_model, "num_prefix_tokens", 0) or 0)
        self._channels_last = getattr(self.image_model, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin
        pooled_width = int(getattr(self.image_model, "head_hidden_size", self.image_model.num_features))

        if text_config is not None:
            config_kwargs = copy.deepcopy(text_config)
            model_type = config_kwargs.pop("model_type", None)
            if model_type is None:
                raise ValueError("TimmBackbone: text_config needs a 'model_type' (e.g. 'bert')")
            hf_config = AutoConfig.for_model(model_type, **config_kwargs)
        else:
            try:
                hf_config = AutoConfig.from_pretrained(text_model)
            except (OSError, ValueError) as err:
                raise RuntimeError(
                    f"TimmBackbone could not read the text tower's config from {text_model!r} ({err}). Offline, "
                    "pass `text_model=` a local folder or `text_config=` (AutoConfig kwargs with model_type)."
                ) from err
        positions = getattr(hf_config, "max_position_embeddings", None)
        if not 1 <= max_length <= (positions or max_length):
            raise ValueError(f"max_length must be in [1, {positions}] (text positions), got {max_length}")
        self.text_model = AutoModel.from_config(hf_config)
        if getattr(self.text_model, "pooler", None) is not None:
            # BERT-style poolers are never used here; without them every parameter gets a gradient (DDP)
            self.text_model.pooler = None

        self.image_projection = nn.Linear(pooled_width, embed_dim)
        self.token_projection = nn.Linear(int(self.image_model.num_features), embed_dim)
        self.text_projection = nn.Linear(hf_config.hidden_size, embed_dim)
        e = embed_dim
        self.composer = composer if composer is not None else Combiner(dim=e, projection_dim=4 * e, hidden_dim=8 * e)
        if freeze_image:
            self.freeze_modules(["image_model"])
        if freeze_text:
            self.freeze_modules(["text_model"])

    def _timm_kwargs(self) -> dict[str, Any]:
        return {**self.image_model_kwargs, "num_classes": 0}

    @property
    def image_config(self) -> ImageConfig:
        """timm's data config of the model (``resolve_model_data_config``): mean, std and resampling filter, with
        the shortest edge resized to ``size`` and a centre crop (timm's eval transform with ``crop_pct = 1``)."""
        return ImageConfig(
            size=self._image_size,
            mean=list(self._mean),
            std=list(self._std),
            resample=self._resample,
            resize_mode="shortest_edge",
        )

    # --- encoders -------------------------------------------------------------------------------------
    def image_stem_modules(self) -> list[str]:
        return ["image_model"]

    def encode_image_stem(self, pixel_values: Tensor) -> Tensor:
        """The timm model's ``forward_features`` (``[B, prefix + N, C]``, ``[B, C, H', W']`` or channels-last)."""
        check_images(pixel_values, self._image_size, "TimmBackbone.encode_image_stem")
        return self.image_model.forward_features(pixel_values)

    def _image_features(self, stem: Tensor) -> tuple[Tensor, Tensor]:
        """``(projected global feature [B, E], projected tokens [B, N, E])``, not normalised."""
        pooled = self.image_model.forward_head(stem, pre_logits=True)
        if stem.dim() == 4:
            tokens = stem.flatten(1, 2) if self._channels_last else stem.flatten(2).transpose(1, 2)
        elif stem.dim() == 3:
            tokens = stem[:, self._prefix_tokens :]
        else:
            raise ValueError(
                f"TimmBackbone: {self.image_model_name}.forward_features gave shape {list(stem.shape)}; expected "
                "[B, N, C] tokens or a [B, C, H, W] feature map"
            )
        return self.image_projection(pooled), self.token_projection(tokens)

    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled feature [B, E], word features [B, L, E])``, projected and not normalised."""
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.text_projection(pooled), self.text_projection(hidden)

    def encode_query(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        check_query_inputs(pixel_values, input_ids, attention_mask, self._image_size, "TimmBackbone.encode_query")
        return self.encode_query_from_stem(self.encode_image_stem(pixel_values), input_ids, attention_mask)

    def encode_query_from_stem(self, stem: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        if stem.shape[0] != input_ids.shape[0]:
            raise ValueError(f"TimmBackbone: {stem.shape[0]} reference images but {input_ids.shape[0]} texts")
        image, patches = self._image_features(stem)
        text, words = self._encode_text(input_ids, attention_mask)
        return two_tower_query(self.composer, image, patches, text, words, attention_mask)

    def encode_target(self, pixel_values: Tensor) -> TargetFeatures:
        check_images(pixel_values, self._image_size, "TimmBackbone.encode_target")
        return self.encode_target_from_stem(self.encode_image_stem(pixel_values))

    def encode_target_from_stem(self, stem: Tensor) -> TargetFeatures:
        image, patches = self._image_features(stem)
        return two_tower_target(image, patches)

    # --- weights --------------------------------------------------------------------------------------
    def load_pretrained(self) -> None:
        """Load the timm model's published weights and the text encoder's weights from ``text_model``.

        The timm weights come from ``image_weights`` when set (a local file, no network), else from timm's own
        source (the Hub or its cache). The projections and the composer keep their initialisation.
        """
        # timm and transformers' model classes cost seconds to import: only when this backbone is built
        import timm
        from transformers import AutoModel  # (transformers, as above)

        overlay = {"pretrained_cfg_overlay": {"file": self.image_weights}} if self.image_weights else {}
        try:
            source = timm.create_model(self.image_model_name, pretrained=True, **self._timm_kwargs(), **overlay)
        except (OSError, RuntimeError, ValueError) as err:
            where = self.image_weights or "timm's hub source"
            raise RuntimeError(
                f"could not load timm weights for {self.image_model_name!r} from {where} ({err}). Offline, set "
                "`image_weights=` a local weights file of that model."
            ) from err
        load_weights(self.image_model, source.state_dict(), f"timm {self.image_model_name!r}")
        text = load_hf_model(AutoModel, self.text_model_name, like=self)
        state = text.state_dict()
        if getattr(self.text_model, "pooler", "absent") is None:
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        load_weights(self.text_model, state, f"text model {self.text_model_name!r}")
