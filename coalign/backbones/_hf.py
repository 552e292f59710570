"""Helpers shared by the transformers-based backbones (CLIP, BLIP-2).

* :class:`HFTokenizerMixin`: a tokenizer that is loaded lazily (so building a backbone never touches the network),
  saved next to the weights by ``save_assets`` and read back by ``load_assets``.
* :class:`FrozenModulesMixin`: frozen sub-modules get no gradient *and* stay in eval mode under ``.train()``.
* Input checks that turn shape/dtype mistakes into messages that say what was expected.
* :func:`load_weights`: strict state-dict loading with a readable error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._features import QueryFeatures, TargetFeatures
from ..io import atomic_write_json, read_json
from ..transforms import PROCESSOR_CONFIG, image_config_from_processor
from .base import ImageConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FrozenModulesMixin",
    "HFTokenizerMixin",
    "check_images",
    "check_query_inputs",
    "enable_gradient_checkpointing",
    "load_hf_model",
    "load_weights",
]

# OpenAI CLIP's preprocessing statistics; BLIP-2 (EVA ViT-g) was trained with the same ones.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TOKENIZER_DIR = "tokenizer"


def check_images(pixel_values: Any, image_size: int, where: str) -> None:
    """Raise a clear error unless ``pixel_values`` is a float ``[B, 3, image_size, image_size]`` tensor, B >= 1."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"{where}: pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"{where}: pixel_values must be a float tensor (normalised images), got dtype {pixel_values.dtype}; "
            "convert uint8 images with the backbone's image_config (mean/std) first"
        )
    expected = (3, image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected or pixel_values.shape[0] == 0:
        raise ValueError(
            f"{where}: pixel_values must have shape [B, 3, {image_size}, {image_size}] with B >= 1, "
            f"got {list(pixel_values.shape)}; resize images to the backbone's image_config['size']"
        )


def check_query_inputs(pixel_values: Any, input_ids: Any, attention_mask: Any, image_size: int, where: str) -> None:
    """Validate a composed-query batch: images as in :func:`check_images`, ``[B, L]`` integer ids and mask."""
    check_images(pixel_values, image_size, where)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{where}: input_ids must be an integer tensor [B, L]; use backbone.tokenize(texts)")
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"{where}: attention_mask must match input_ids {list(input_ids.shape)}, got {shape}")
    if input_ids.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"{where}: {pixel_values.shape[0]} reference images but {input_ids.shape[0]} texts; "
            "every reference image needs exactly one modification text"
        )


def two_tower_query(composer: nn.Module, image: Tensor, patches: Tensor, text: Tensor, words: Tensor,
                    attention_mask: Tensor) -> QueryFeatures:  # fmt: skip
    """The query of a two-tower backbone (CLIP, timm): the composer fuses the normalised global image and text
    features; the local tokens are the image patches followed by the words, with the text's padding masked."""
    composed = composer(F.normalize(image, dim=-1), F.normalize(text, dim=-1))
    tokens = F.normalize(torch.cat([patches, words], dim=1), dim=-1)
    patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    mask = torch.cat([patch_mask, attention_mask.to(device=patches.device, dtype=torch.bool)], dim=1)
    return QueryFeatures(embedding=F.normalize(composed, dim=-1), tokens=tokens, token_mask=mask)


def two_tower_target(image: Tensor, patches: Tensor) -> TargetFeatures:
    """The target of a two-tower backbone: the normalised global image feature and the normalised patches."""
    return TargetFeatures(embedding=F.normalize(image, dim=-1).unsqueeze(1), tokens=F.normalize(patches, dim=-1))


def load_weights(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that names the source and the keys."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"the weights from {source} do not fit {type(module).__name__}: is the backbone's `config` the "
            f"architecture of that checkpoint?\n{err}"
        ) from err


def enable_gradient_checkpointing(towers: Sequence[nn.Module]) -> None:
    """Turn on transformers' gradient checkpointing (non-reentrant) in each tower: in training mode its layers
    keep only their inputs and recompute the rest in the backward pass."""
    # transformers is already imported by the backbone that calls this: only the logging switch
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    # non-reentrant checkpointing needs no gradient on the inputs; transformers would warn that the Q-Former has
    # no input embeddings to hook for the reentrant variant
    hf_logging.set_verbosity_error()
    try:
        for tower in towers:
            kwargs = {"use_reentrant": False}
            if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    finally:
        hf_logging.set_verbosity(level)


class FrozenModulesMixin:
    """Freeze named sub-modules: no gradient, and kept in eval mode so dropout/normalisation stay deterministic.

    ``requires_grad=False`` alone is not enough: ``LightningModule.train()`` would switch the frozen towers back to
    training mode and their dropout would change the features that the trainable parts learn from.
    """

    _frozen_modules: tuple[str, ...] = ()

    def freeze_modules(self, names: Sequence[str]) -> None:
        self._frozen_modules = tuple(dict.fromkeys((*self._frozen_modules, *names)))
        for name in names:
            module = self.get_submodule(name)  # type: ignore[attr-defined]
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module.train, plus the frozen parts stay in eval
        super().train(mode)  # type: ignore[misc]
        for name in self._frozen_modules:
            self.get_submodule(name).eval()  # type: ignore[attr-defined]
        return self


class HFTokenizerMixin:
    """A lazily loaded Hugging Face tokenizer that pads every text to ``max_length``.

    Subclasses set ``self.tokenizer_source`` (hub id or local folder) and ``self.max_length`` in their constructor.
    The tokenizer is not built in ``__init__`` because that would reach for the Hub (or its cache) every time a
    checkpoint is loaded, even when the checkpoint folder carries its own tokenizer (see :meth:`load_assets`).
    """

    tokenizer_source: str
    max_length: int
    _tokenizer: Any = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use an already built tokenizer (e.g. one made in memory); :meth:`save_assets` will save it."""
        self._tokenizer = tokenizer

    def get_tokenizer(self) -> Any:
        """The tokenizer, loading it with ``AutoTokenizer.from_pretrained(tokenizer_source)`` on first use."""
        if self._tokenizer is None:
            # transformers' model classes cost seconds to import: only when this backbone is built
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
            except (OSError, ValueError) as err:
                raise RuntimeError(
                    f"{type(self).__name__} could not load its tokenizer from {self.tokenizer_source!r} ({err}). "
                    "Offline, pass `tokenizer=` a local folder holding a saved tokenizer, load a model folder that "
                    "contains one (load_assets), or call `set_tokenizer(...)`."
                ) from err
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise texts into ``input_ids`` and ``attention_mask``, both ``[B, max_length]``.

        Raises:
            ValueError: ``texts`` is empty or holds something other than strings.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"tokenize expects a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("tokenize got an empty list of texts; a batch needs at least one modification text")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"tokenize expects strings; items {bad[:5]} are not")
        encoded = self.get_tokenizer()(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        # A fixed length keeps the number of query tokens independent of the batch (the Backbone contract).
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def save_assets(self, directory: Path) -> None:
        """Save the tokenizer to ``directory/tokenizer/`` so the folder loads offline.

        If the tokenizer was never used and cannot be loaded now (offline), a warning says the folder will need
        ``tokenizer=`` when it is loaded; the weights are still saved.
        """
        try:
            tokenizer = self.get_tokenizer()
        except RuntimeError as err:
            warnings.warn(f"tokenizer not saved with the model: {err}", stacklevel=2)
            return
        tokenizer.save_pretrained(str(Path(directory) / TOKENIZER_DIR))

    def load_assets(self, directory: Path) -> None:
        """Use the tokenizer saved by :meth:`save_assets` in ``directory``, if there is one."""
        folder = Path(directory) / TOKENIZER_DIR
        if folder.is_dir():
            # transformers' model classes cost seconds to import: only when this backbone is built
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(folder))


class ProcessorConfigMixin:
    """Image settings from the checkpoint's ``preprocessor_config.json``, for backbones built on transformers.

    A backbone states its processor's own settings in ``_own_image_config()`` (size, mean, std, resampling, resize
    mode); a ``preprocessor_config.json`` next to the pretrained weights (:meth:`read_processor_config`) or saved
    in a checkpoint's assets overrides them, and is saved again with the assets so a reloaded model keeps it.
    """

    _processor_config: dict[str, Any] | None = None
    _image_size: int

    def _own_image_config(self) -> ImageConfig:
        raise NotImplementedError

    @property
    def image_config(self) -> ImageConfig:
        own = self._own_image_config()
        if self._processor_config is None:
            return own
        return ImageConfig(image_config_from_processor(self._processor_config, default=own))

    def read_processor_config(self, folder: str | Path) -> None:
        """Use the image settings of ``folder/preprocessor_config.json`` if it exists (a clear error if unusable)."""
        path = Path(folder) / PROCESSOR_CONFIG
        if not path.is_file():
            return
        config = read_json(path, "image processor config")
        image_config_from_processor(config, self._own_image_config(), str(path), expected_size=self._image_size)
        self._processor_config = dict(config)

    def save_assets(self, directory: Path) -> None:
        super().save_assets(directory)
        if self._processor_config is not None:
            atomic_write_json(Path(directory) / PROCESSOR_CONFIG, self._processor_config, indent=2)

    def load_assets(self, directory: Path) -> None:
        super().load_assets(directory)
        self.read_processor_config(directory)


def load_hf_model(model_cls: Any, name: str, like: nn.Module) -> Any:
    """``model_cls.from_pretrained(name)`` in ``like``'s dtype, with an error that says what to do offline."""
    # The module's own dtype, so a bf16 backbone does not briefly hold an fp32 copy of a 1B-parameter tower.
    dtype = next(like.parameters()).dtype
    try:
        return model_cls.from_pretrained(name, dtype=dtype)
    except OSError as err:
        raise RuntimeError(
            f"could not load {model_cls.__name__} weights from {name!r} ({err}). Offline, set `model_name` to a "
            "local folder written by save_pretrained (a downloaded snapshot of the checkpoint)."
        ) from err
