"""Image preprocessing that travels with a model: resize, centre crop, normalise, optional target pad."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

__all__ = ["ImageTransform", "target_pad"]


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


class ImageTransform:
    """PIL image (or uint8 tensor ``[3,H,W]``) to a normalised float tensor ``[3, size, size]``.

    Args:
        size: output side in pixels (resize the short side, then centre crop).
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation.
        target_pad_ratio: if set, apply :func:`target_pad` with this ratio first (1.25 for real-image
            benchmarks, as CLIP4Cir and SPRC do); None keeps the backbone's plain resize + crop.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        target_pad_ratio: float | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        if target_pad_ratio is not None and target_pad_ratio < 1:
            raise ValueError(f"target_pad_ratio must be >= 1, got {target_pad_ratio}")
        self.size = int(size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.target_pad_ratio = target_pad_ratio

    def config(self) -> dict[str, Any]:
        return {"size": self.size, "mean": self.mean, "std": self.std, "target_pad_ratio": self.target_pad_ratio}

    def __repr__(self) -> str:
        return f"ImageTransform({self.config()})"

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Tensor):
            if image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
            if image.shape[0] == 1:
                image = image.expand(3, -1, -1)
            tensor = image if image.is_floating_point() else image.float() / 255.0
        elif isinstance(image, Image.Image):
            if self.target_pad_ratio is not None:
                image = target_pad(image, self.target_pad_ratio)
            tensor = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
        else:
            raise TypeError(f"expected a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
        tensor = TF.resize(tensor, self.size, antialias=True)
        tensor = TF.center_crop(tensor, [self.size, self.size])
        return TF.normalize(tensor, self.mean, self.std)

    def batch(self, images: Sequence[Image.Image | Tensor]) -> Tensor:
        """Transform a list of images into one ``[B, 3, size, size]`` tensor."""
        if len(images) == 0:
            raise ValueError("got an empty list of images")
        return torch.stack([self(im) for im in images])
