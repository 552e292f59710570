"""Backbones (image + text encoders that produce query and target features) and composers."""

from .base import Backbone
from .composers import Combiner, Composer, ImageOnlyComposer, SumComposer, TextOnlyComposer

__all__ = ["Backbone", "Composer", "Combiner", "SumComposer", "ImageOnlyComposer", "TextOnlyComposer"]
from .blip2 import Blip2Backbone  # noqa: E402
from .clip import CLIPBackbone  # noqa: E402

__all__ += ["CLIPBackbone", "Blip2Backbone"]
