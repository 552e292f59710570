"""coalign: Composed Image Retrieval with CoAlign.

>>> import coalign
>>> model = coalign.create_model("coalign_tiny")
>>> scores = model.similarity(model.encode_queries(refs, texts), model.encode_targets(gallery))

``import coalign`` imports nothing heavy: the names below are loaded on first use (PEP 562), so the ``coalign``
command starts without importing torch, Lightning or transformers until a subcommand needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are loaded by __getattr__
    from ._features import QueryFeatures, TargetFeatures
    from .factory import create_model, load_model
    from .index import Index
    from .model import CoAlign
    from .registry import build_component, list_components, list_models, register_component, register_model
    from .transforms import ImageTransform, target_pad

#: public name -> the submodule that defines it
_EXPORTS = {
    "CoAlign": "model",
    "create_model": "factory",
    "load_model": "factory",
    "Index": "index",
    "list_models": "registry",
    "QueryFeatures": "_features",
    "TargetFeatures": "_features",
    "ImageTransform": "transforms",
    "target_pad": "transforms",
    "build_component": "registry",
    "list_components": "registry",
    "register_component": "registry",
    "register_model": "registry",
}

#: modules whose names only make sense once coalign.factory registered the named models and components
_NEED_REGISTRY = {"registry", "model", "index"}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # `coalign.evaluation`, `coalign.datamodules`, ...: a submodule reached as an attribute loads on first use
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if module in _NEED_REGISTRY:  # the registered models and components are those of coalign.factory's imports
        importlib.import_module(f"{__name__}.factory")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
