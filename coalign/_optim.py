"""Optimizer and scheduler factories that can be stored as JSON specs (hparams, config.json).

A factory is described as ``{"class_path": "torch.optim.AdamW", "init_args": {...}}``. Only classes from
``torch.optim`` and ``torch.optim.lr_scheduler`` may be named, so a stored spec can never import arbitrary code.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["OptimizerFactory", "build_optimizer_callable", "optimizer_spec"]

_ALLOWED_MODULES = ("torch.optim", "torch.optim.lr_scheduler")


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    for allowed in _ALLOWED_MODULES:
        if module == allowed or module.startswith(allowed + "."):
            target = torch.optim.lr_scheduler if "lr_scheduler" in module else torch.optim
            cls = getattr(target, name, None)
            if isinstance(cls, type):
                return cls
    raise ValueError(f"{class_path!r} is not an optimizer or scheduler of torch.optim; name one of those")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (list,)):
        return [_jsonable(v) for v in value]
    return value


class OptimizerFactory:
    """``factory(params_or_optimizer)`` builds ``cls(params_or_optimizer, **init_args)``; describable as a spec."""

    def __init__(self, cls: type, init_args: dict[str, Any] | None = None):
        self.cls = cls
        self.init_args = dict(init_args or {})

    def __call__(self, target):
        args = {k: tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in self.init_args.items()}
        return self.cls(target, **args)

    def spec(self) -> dict[str, Any]:
        path = (
            f"torch.optim.lr_scheduler.{self.cls.__name__}"
            if issubclass(self.cls, torch.optim.lr_scheduler.LRScheduler)
            else f"torch.optim.{self.cls.__name__}"
        )
        return {"class_path": path, "init_args": {k: _jsonable(v) for k, v in self.init_args.items()}}

    def __repr__(self) -> str:
        return f"OptimizerFactory({self.spec()})"


def build_optimizer_callable(value: Any):
    """Normalise a class, ``functools.partial``, jsonargparse callable or spec dict into a factory."""
    if value is None or isinstance(value, OptimizerFactory):
        return value
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        if "class_path" not in value:
            raise ValueError(f"an optimizer spec needs a class_path, got {value!r}")
        return OptimizerFactory(_resolve(value["class_path"]), value.get("init_args") or {})
    if isinstance(value, type):
        return OptimizerFactory(value)
    if isinstance(value, functools.partial):
        classes = [a for a in (value.func, *value.args) if isinstance(a, type)]
        if classes and all(isinstance(a, type) or callable(a) for a in value.args):
            return OptimizerFactory(classes[-1], value.keywords)
    if callable(value):
        return value  # an arbitrary callable: usable, but not describable (stored as None)
    raise TypeError(f"expected an optimizer class, factory or spec, got {value!r}")


def optimizer_spec(factory) -> dict[str, Any] | None:
    return factory.spec() if isinstance(factory, OptimizerFactory) else None
