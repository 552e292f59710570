"""Image preprocessing that travels with a model: resize, centre crop, normalise, optional target pad.

:class:`ImageTransform` reproduces the image processors of the checkpoints a backbone loads: CLIP's (resize the
shortest edge, bicubic, then centre crop) and BLIP-2's (resize straight to ``size x size``, bicubic), with the
CIR target pad (CLIP4Cir / SPRC) as an option. :func:`image_config_from_processor` reads those settings from a
Hugging Face ``preprocessor_config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

__all__ = [
    "PROCESSOR_CONFIG",
    "ImageTransform",
    "RESAMPLE_MODES",
    "RESIZE_MODES",
    "image_config_from_processor",
    "target_pad",
]

# the file in which transformers keeps a checkpoint's image processor settings
PROCESSOR_CONFIG = "preprocessor_config.json"

# name -> (PIL filter for PIL images, torchvision mode for tensors), the pairs transformers maps onto each other
_RESAMPLE = {
    "bicubic": (Image.Resampling.BICUBIC, InterpolationMode.BICUBIC),
    "bilinear": (Image.Resampling.BILINEAR, InterpolationMode.BILINEAR),
    "nearest": (Image.Resampling.NEAREST, InterpolationMode.NEAREST_EXACT),
}
RESAMPLE_MODES = tuple(_RESAMPLE)
# "shortest_edge": the short side becomes ``size``, then a centre crop (CLIP); "square": straight to size x size (BLIP)
RESIZE_MODES = ("shortest_edge", "square")
# PIL's resampling codes, as transformers stores them in preprocessor_config.json
_PIL_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_PIL_NAMES = {1: "lanczos", 4: "box", 5: "hamming"}


def target_pad(image: Image.Image, ratio: float = 1.25) -> Image.Image:
    """Pad an image whose aspect ratio exceeds ``ratio`` with black to exactly ``ratio`` (CLIP4Cir / SPRC).

    An image of size (w, h) with ``max(w, h) / min(w, h) > ratio`` gets padded on both sides of its short
    dimension so that the long side divided by the short side equals ``ratio``; other images are unchanged.
    """
    w, h = image.size
    long_side, short_side = max(w, h), min(w, h)
    if short_side == 0 or long_side / short_side <= ratio:
        return image
    new_short = int(round(long_side / ratio))
    pad_total = new_short - short_side
    before = pad_total // 2
    canvas = Image.new(image.mode, (w, new_short) if w >= h else (new_short, h))
    canvas.paste(image, (0, before) if w >= h else (before, 0))
    return canvas


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers' ``do_convert_rgb`` does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """PIL image (or uint8/float tensor ``[3,H,W]``) to a normalised float tensor ``[3, size, size]``.

    With ``resample`` set, the steps and their rounding are those of transformers' image processors and of the
    original CLIP / LAVIS preprocessing: transparency composited onto white, the image resized with PIL's filter
    (uint8 in, uint8 out), a centre crop whose offset rounds down, then ``(x / 255 - mean) / std``. Tensors are
    resized with torchvision (uint8 tensors with antialiasing, as transformers' torchvision processors do).

    Args:
        size: output side in pixels.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation.
        target_pad_ratio: if set, apply :func:`target_pad` with this ratio first (1.25 for real-image
            benchmarks, as CLIP4Cir and SPRC do); None keeps the backbone's plain resize.
        resample: ``"bicubic"`` (CLIP, BLIP-2), ``"bilinear"`` or ``"nearest"``. None is the transform of configs
            saved before this option existed, kept as it was: pixels turned to float first, then an antialiased
            bilinear resize and torchvision's centre crop (its offset rounds to nearest), alpha dropped.
        resize_mode: ``"shortest_edge"`` resizes the short side to ``size`` (the long side to
            ``int(size * long / short)``) then centre crops (CLIP); ``"square"`` resizes straight to
            ``size x size``, changing the aspect ratio (BLIP-2).
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        target_pad_ratio: float | None = None,
        resample: str | None = None,
        resize_mode: str = "shortest_edge",
    ) -> None:
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        if target_pad_ratio is not None and target_pad_ratio < 1:
            raise ValueError(f"target_pad_ratio must be >= 1, got {target_pad_ratio}")
        if resample is not None and resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {list(RESAMPLE_MODES)} or None, got {resample!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {resize_mode!r}")
        self.size = int(size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 numbers each, std > 0; got mean {self.mean}, std {self.std}")
        self.target_pad_ratio = target_pad_ratio
        self.resample = resample
        self.resize_mode = resize_mode

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (``ImageTransform(**t.config())`` rebuilds ``t``)."""
        return {
            "size": self.size,
            "mean": self.mean,
            "std": self.std,
            "target_pad_ratio": self.target_pad_ratio,
            "resample": self.resample,
            "resize_mode": self.resize_mode,
        }

    def __repr__(self) -> str:
        return f"ImageTransform({self.config()})"

    def _resized_hw(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_mode == "square":
            return self.size, self.size
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def _crop(self, tensor: Tensor) -> Tensor:
        height, width = tensor.shape[-2:]
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return tensor[..., top : top + self.size, left : left + self.size]

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Tensor):
            if image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
            if image.shape[0] == 1:
                image = image.expand(3, -1, -1)
            if image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(f"the image tensor has no pixels: shape {tuple(image.shape)}")
        elif not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
        elif image.width == 0 or image.height == 0:
            raise ValueError(f"the image has no pixels: {image.width}x{image.height}")
        if self.resample is None:
            return self._legacy(image)
        pil_filter, tv_mode = _RESAMPLE[self.resample]
        if isinstance(image, Tensor):
            height, width = image.shape[-2:]
            tensor = TF.resize(image, list(self._resized_hw(height, width)), interpolation=tv_mode, antialias=True)
            tensor = self._crop(tensor)
            tensor = tensor.float() if tensor.is_floating_point() else tensor.float() / 255.0
        else:
            image = _to_rgb(image)
            if self.target_pad_ratio is not None:
                image = target_pad(image, self.target_pad_ratio)
            height, width = self._resized_hw(image.height, image.width)
            image = image.resize((width, height), resample=pil_filter)
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
            tensor = self._crop(pixels).float() / 255.0
        return TF.normalize(tensor, self.mean, self.std)

    def _legacy(self, image: Image.Image | Tensor) -> Tensor:
        """``resample=None``: the transform of configs saved before ``resample`` existed, unchanged."""
        if isinstance(image, Tensor):
            tensor = image if image.is_floating_point() else image.float() / 255.0
        else:
            if self.target_pad_ratio is not None:
                image = target_pad(image, self.target_pad_ratio)
            tensor = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
        if self.resize_mode == "square":
            tensor = TF.resize(tensor, [self.size, self.size], antialias=True)
        else:
            tensor = TF.resize(tensor, self.size, antialias=True)
        tensor = TF.center_crop(tensor, [self.size, self.size])
        return TF.normalize(tensor, self.mean, self.std)

    def batch(self, images: Sequence[Image.Image | Tensor]) -> Tensor:
        """Transform a list of images into one ``[B, 3, size, size]`` tensor."""
        if len(images) == 0:
            raise ValueError("got an empty list of images")
        return torch.stack([self(im) for im in images])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _side(value: Any, key: str, source: str) -> int:
    """A square side from ``224`` or ``{"height": 224, "width": 224}``; ``key`` names the entry in errors."""
    if _is_int(value) and value > 0:
        return value
    if isinstance(value, Mapping) and set(value) == {"height", "width"}:
        height, width = value["height"], value["width"]
        if _is_int(height) and _is_int(width) and height == width > 0:
            return height
        raise ValueError(f"{source}: '{key}' must be square ({height}x{width} given); coalign's images are square")
    raise ValueError(f"{source}: '{key}' must be a positive int or {{'height': n, 'width': n}}, got {value!r}")


def _channels(value: Any, key: str, source: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{source}: '{key}' must be 3 numbers (one per RGB channel), got {value!r}")
    return [float(v) for v in value]


def image_config_from_processor(
    config: Mapping[str, Any],
    default: Mapping[str, Any] | None = None,
    source: str = "image processor config",
    expected_size: int | None = None,
) -> dict[str, Any]:
    """The ``image_config`` of a transformers image processor's settings (a ``preprocessor_config.json`` dict).

    Understands ``CLIPImageProcessor`` (``size: {"shortest_edge": n}`` or an int, ``do_center_crop`` with
    ``crop_size`` n: ``resize_mode="shortest_edge"``) and ``BlipImageProcessor`` (``size: {"height": n,
    "width": n}``: ``resize_mode="square"``), ``resample`` as PIL's code (3 bicubic, 2 bilinear, 0 nearest),
    ``image_mean`` / ``image_std`` (``do_normalize: false`` means mean 0, std 1). Missing entries come from
    ``default`` (the backbone's own image_config).

    Args:
        config: the processor's settings.
        default: ``{"size", "mean", "std", "resample", "resize_mode"}`` used for entries ``config`` lacks.
        source: how errors name the config (its file path).
        expected_size: when set, the output size must be this one (the vision tower's input size).

    Returns:
        ``{"size": int, "mean": [3], "std": [3], "resample": str, "resize_mode": str}``.

    Raises:
        ValueError: a setting :class:`ImageTransform` cannot reproduce (no resize, no rescale to [0, 1], a
            non-square output, a crop smaller than the resized image, LANCZOS...) or a malformed entry.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    default = dict(default or {})

    def fallback(key: str, out_key: str) -> Any:
        if out_key not in default:
            raise ValueError(f"{source}: has no '{key}' and there is no default for it")
        return default[out_key]

    if config.get("do_resize", True) is False:
        raise ValueError(f"{source}: 'do_resize' is false; a model needs its images at one fixed size")
    if config.get("do_rescale", True) is False:
        raise ValueError(f"{source}: 'do_rescale' is false; coalign always scales pixels to [0, 1] first")
    factor = config.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-9:
        raise ValueError(f"{source}: 'rescale_factor' must be 1/255 (pixels to [0, 1]), got {factor!r}")

    do_crop = config.get("do_center_crop", False) is True
    crop = _side(config["crop_size"], "crop_size", source) if do_crop and "crop_size" in config else None
    if "size" in config:
        size = config["size"]
        if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
            side, mode = _side(size["shortest_edge"], "size.shortest_edge", source), "shortest_edge"
            if not do_crop:
                raise ValueError(f"{source}: resizes the shortest edge with no centre crop: images would not be square")
        else:
            side = _side(size, "size", source)
            # an int size is the shortest edge when a crop follows (CLIP's old configs), the square side otherwise
            mode = "shortest_edge" if do_crop and _is_int(size) else "square"
        if crop is not None and crop != side:
            raise ValueError(
                f"{source}: 'crop_size' {crop} differs from the resized size {side}; coalign crops to the resized size"
            )
    else:
        side, mode = fallback("size", "size"), fallback("size", "resize_mode")

    if "resample" in config:
        code = config["resample"]
        if isinstance(code, str) and code.lower() in _RESAMPLE:
            resample = code.lower()
        elif _is_int(code) and code in _PIL_CODES:
            resample = _PIL_CODES[code]
        else:
            name = _PIL_NAMES.get(code, code) if _is_int(code) else code
            raise ValueError(f"{source}: 'resample' {name!r} is not supported; use one of {list(RESAMPLE_MODES)}")
    else:
        resample = fallback("resample", "resample")

    if config.get("do_normalize", True) is False:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    else:
        mean = _channels(config["image_mean"], "image_mean", source) if "image_mean" in config else None
        std = _channels(config["image_std"], "image_std", source) if "image_std" in config else None
        mean = mean if mean is not None else _channels(fallback("image_mean", "mean"), "image_mean", source)
        std = std if std is not None else _channels(fallback("image_std", "std"), "image_std", source)
        if min(std) <= 0:
            raise ValueError(f"{source}: 'image_std' must be positive, got {std}")
    if expected_size is not None and side != expected_size:
        raise ValueError(
            f"{source}: the processor makes {side}x{side} images but the vision tower takes {expected_size}x"
            f"{expected_size}"
        )
    return {"size": int(side), "mean": mean, "std": std, "resample": resample, "resize_mode": mode}
