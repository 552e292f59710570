"""The filter contracts: a member pair as filters see it, the :class:`PairFilter` base class and the image check.

Filters judge each *member pair* of a group: its source panel (the reference) and one edit's panel (the
target), with their captions and modification texts. A group whose source is unreadable or blank thus loses
every member at the image check. A new filter subclasses :class:`PairFilter` (``score`` a batch of pairs, decide
with ``passes``) and is passed to
``pipeline.run(..., filters=[...])``; :mod:`.filter` runs the cascade, :mod:`.model_filters` holds
the model-based filters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import ImageCheckConfig

__all__ = ["PairInput", "PairFilter", "ImageCheck"]


@dataclass
class PairInput:
    """One member pair as a filter sees it; its images are decoded once, on first use.

    Attributes:
        index: the group index.
        member: the edit's position in the group's ``edits`` (its panel is ``member + 1``).
        pair: ``reference_caption`` (the source's), ``target_caption`` (the edit's), ``forward``, ``backward``.
        reference: the source panel's image file.
        target: the edit panel's image file.
    """

    index: int
    member: int
    pair: dict[str, Any]
    reference: Path
    target: Path
    _images: tuple[Image.Image, Image.Image] | None = field(default=None, repr=False)

    def images(self) -> tuple[Image.Image, Image.Image]:
        if self._images is None:
            self._images = (_open(self.reference), _open(self.target))
        return self._images


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class PairFilter(ABC):
    """A filter: scores a batch of pairs, then decides on one pair's scores with its thresholds.

    Attributes:
        name: folder name of its scores, key in the report.
        batch_size: pairs per :meth:`score` call.
    """

    name: str = "filter"
    batch_size: int = 32

    def setup(self, device: torch.device) -> None:  # noqa: B027 (optional hook)
        """Load models (only when there are pairs left to score)."""

    def teardown(self) -> None:  # noqa: B027 (optional hook)
        """Drop models."""

    def settings(self) -> dict[str, Any]:
        """What determines the scores (not the thresholds); resuming with other settings is refused."""
        return {}

    @abstractmethod
    def score(self, pairs: Sequence[PairInput]) -> list[dict[str, Any]]:
        """JSON-serialisable scores per pair."""

    @abstractmethod
    def passes(self, scores: dict[str, Any]) -> bool:
        """Decision for one pair under the current thresholds."""


class ImageCheck(PairFilter):
    """Both panels must be readable images that are not blank (pixel standard deviation below ``min_std``).

    Never raises on a bad file: an unreadable image is a score (``readable: false`` and the error), not a crash.
    """

    name = "image_check"
    batch_size = 64

    def __init__(self, config: ImageCheckConfig):
        self.config = config

    def score(self, pairs: Sequence[PairInput]) -> list[dict[str, Any]]:
        out = []
        for pair in pairs:
            try:
                ref, tgt = pair.images()
            except Exception as err:  # truncated PNG, missing file, not an image: all mean "unusable"
                out.append({"readable": False, "error": f"{type(err).__name__}: {err}"})
                continue
            out.append(
                {
                    "readable": True,
                    "reference_std": float(np.asarray(ref, dtype=np.float32).std()),
                    "target_std": float(np.asarray(tgt, dtype=np.float32).std()),
                    "reference_size": list(ref.size),
                    "target_size": list(tgt.size),
                }
            )
        return out

    def passes(self, scores: dict[str, Any]) -> bool:
        return bool(scores["readable"]) and min(scores["reference_std"], scores["target_std"]) >= self.config.min_std
