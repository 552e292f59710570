"""coalign: Composed Image Retrieval with CoAlign.

>>> import coalign
>>> model = coalign.create_model("coalign_tiny")
>>> scores = model.similarity(model.encode_queries(refs, texts), model.encode_targets(gallery))
"""

from ._features import QueryFeatures, TargetFeatures
from ._version import __version__
from .factory import create_model, load_model
from .index import Index
from .model import CoAlign
from .registry import build_component, list_components, list_models, register_component, register_model
from .transforms import ImageTransform, target_pad

__all__ = [
    "__version__",
    "CoAlign",
    "create_model",
    "load_model",
    "Index",
    "list_models",
    "QueryFeatures",
    "TargetFeatures",
    "ImageTransform",
    "target_pad",
    "build_component",
    "list_components",
    "register_component",
    "register_model",
]
