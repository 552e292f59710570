"""The :class:`Backbone` contract: images and texts in, :class:`QueryFeatures` / :class:`TargetFeatures` out."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from torch import Tensor

from .._features import QueryFeatures, TargetFeatures
from ..registry import Component

__all__ = ["Backbone", "ImageConfig"]


class ImageConfig(dict):
    """Preprocessing a backbone expects, the arguments of :class:`coalign.transforms.ImageTransform`.

    ``{"size": int, "mean": [3 floats], "std": [3 floats]}`` and optionally ``"resample"`` (``"bicubic"``,
    ``"bilinear"``, ``"nearest"``; absent: the float bilinear resize of configs written before it existed) and
    ``"resize_mode"`` (``"shortest_edge"``: short side to ``size`` then centre crop, the default; ``"square"``:
    straight to ``size x size``). A backbone with published weights states its source's image processor here
    (CLIP: bicubic, shortest edge + crop; BLIP-2: bicubic, square) and, when it loads weights from a folder
    holding a ``preprocessor_config.json``, the settings of that file
    (:func:`coalign.transforms.image_config_from_processor`).
    """


class Backbone(Component, abc.ABC):
    """Encodes composed queries and targets.

    A backbone owns its tokenizer and declares its image preprocessing, so a model built from it goes from
    PIL images and strings to scores. Subclasses set ``embed_dim`` (E, the global embedding width) and
    ``token_dim`` (D, the local token width) in their constructor.

    Contract (checked for every registered backbone by ``tests/test_model.py``):

    * ``encode_query(pixel_values [B,3,H,W] float, input_ids [B,L] long, attention_mask [B,L])`` returns
      :class:`QueryFeatures` with a normalised ``embedding [B, E]`` and ``tokens [B, Lq, D]`` where ``Lq`` does
      not depend on the batch.
    * ``encode_target(pixel_values)`` returns :class:`TargetFeatures` with a normalised
      ``embedding [B, K, E]`` and ``tokens [B, Lt, D]``.
    * ``tokenize(texts)`` returns ``{"input_ids", "attention_mask"}`` tensors, padded to a fixed length.
    """

    embed_dim: int
    token_dim: int

    @property
    @abc.abstractmethod
    def image_config(self) -> dict[str, Any]:
        """The :class:`ImageConfig` of the images this backbone expects (``size``, ``mean``, ``std``, ...)."""

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise modification texts into ``input_ids`` and ``attention_mask`` (``[B, L]`` each)."""

    @abc.abstractmethod
    def encode_query(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        """Compose reference images ``[B, 3, H, W]`` with tokenised texts into query features."""

    @abc.abstractmethod
    def encode_target(self, pixel_values: Tensor) -> TargetFeatures:
        """Encode candidate/target images ``[B, 3, H, W]``."""

    # --- optional hooks -------------------------------------------------------------------------------
    def load_pretrained(self) -> None:
        """Load the backbone's published base weights (e.g. from ``Salesforce/blip2-itm-vit-g``).

        Called by ``create_model(..., pretrained=True)`` only, never when a full coalign checkpoint is
        about to overwrite the weights.
        """
        raise NotImplementedError(f"{type(self).__name__} has no published base weights")

    def save_assets(self, directory: Path) -> None:
        """Write files other than weights that the backbone needs (a tokenizer) into ``directory``."""

    def load_assets(self, directory: Path) -> None:
        """Read what :meth:`save_assets` wrote; called after construction when loading a checkpoint folder."""

    def frozen_parameter_names(self) -> list[str]:
        """Names of parameters that are frozen (``requires_grad=False``) by construction options."""
        return [n for n, p in self.named_parameters() if not p.requires_grad]

    # --- the frozen image stem (``CoAlign(feature_cache=...)``) ------------------------------------------
    # A backbone whose image encoder can be frozen splits ``encode_query`` / ``encode_target`` in two:
    # ``encode_image_stem`` (the frozen part, pixels -> stem features) and ``*_from_stem`` (the rest), with
    # ``encode_query(x, ids, mask) == encode_query_from_stem(encode_image_stem(x), ids, mask)`` exactly.
    def image_stem_modules(self) -> list[str]:
        """Names of the sub-modules that compute :meth:`encode_image_stem`; [] when there is no such split."""
        return []

    def image_stem_frozen(self) -> bool:
        """True when the backbone has an image stem and none of its parameters trains (its outputs can be cached)."""
        names = self.image_stem_modules()
        params = [p for name in names for p in self.get_submodule(name).parameters()]
        return bool(params) and not any(p.requires_grad for p in params)

    def encode_caption(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised features ``[B, E]`` of image *descriptions* in the targets' embedding space, for
        ``CoAlign(caption_loss_weight > 0)``: an image-text contrastive term (BLIP-2's ITC) that grounds the words
        of a text tower trained from scratch in pixels. Backbones with pretrained towers need not implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not encode captions (caption_loss_weight must be 0)")

    def encode_image_stem(self, pixel_values: Tensor) -> Tensor:
        """The frozen image stem's features ``[B, *stem_shape]`` of images ``[B, 3, H, W]``."""
        raise NotImplementedError(f"{type(self).__name__} has no image stem to cache")

    def encode_query_from_stem(self, stem: Tensor, input_ids: Tensor, attention_mask: Tensor) -> QueryFeatures:
        """:meth:`encode_query` from the reference images' stem features."""
        raise NotImplementedError(f"{type(self).__name__} has no image stem to cache")

    def encode_target_from_stem(self, stem: Tensor) -> TargetFeatures:
        """:meth:`encode_target` from the target images' stem features."""
        raise NotImplementedError(f"{type(self).__name__} has no image stem to cache")
