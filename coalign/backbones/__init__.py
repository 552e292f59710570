"""Backbones (image + text encoders that produce query and target features) and composers."""

from .base import Backbone
from .blip2 import Blip2Backbone
from .clip import CLIPBackbone
from .composers import Combiner, Composer, ImageOnlyComposer, SumComposer, TextOnlyComposer
from .timm_backbone import TimmBackbone
from .tiny import HashingTokenizer, TinyBackbone

__all__ = [
    "Backbone",
    "Composer",
    "Combiner",
    "SumComposer",
    "ImageOnlyComposer",
    "TextOnlyComposer",
    "TinyBackbone",
    "HashingTokenizer",
    "CLIPBackbone",
    "Blip2Backbone",
    "TimmBackbone",
]
