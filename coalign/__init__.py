"""coalign: Composed Image Retrieval with CoAlign."""

from ._features import QueryFeatures, TargetFeatures
from ._registry import build_component, list_components, list_models, register_component, register_model

__version__ = "0.1.0"

__all__ = [
    "QueryFeatures",
    "TargetFeatures",
    "build_component",
    "list_components",
    "list_models",
    "register_component",
    "register_model",
]
