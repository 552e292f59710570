"""Backbones (image + text encoders that produce query and target features) and composers."""

from .base import Backbone
from .composers import Combiner, Composer, ImageOnlyComposer, SumComposer, TextOnlyComposer

__all__ = ["Backbone", "Composer", "Combiner", "SumComposer", "ImageOnlyComposer", "TextOnlyComposer"]
