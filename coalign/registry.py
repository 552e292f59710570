"""Component specs and the two registries: components (by class path) and models (by name).

Every pluggable part of coalign (backbones, composers, heads) derives from :class:`Component`. A component
remembers the arguments it was built with, so it can describe itself as a JSON *spec*::

    {"class_path": "coalign.heads.ContextualAlignmentHead", "init_args": {"beta": 0.1, ...}}

That one dict is what Lightning's hparams, the Hub's ``config.json`` and ``load_from_checkpoint`` store.
:func:`build_component` turns a spec back into an object, but only for classes registered with
:func:`register_component`: a config downloaded from the network can never import an arbitrary path.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "Component",
    "register_component",
    "build_component",
    "list_components",
    "register_model",
    "list_models",
    "get_model_fn",
]

_COMPONENTS: dict[str, type] = {}
_MODELS: dict[str, Callable[..., Any]] = {}

T = TypeVar("T", bound=type)
_JSON_SCALARS = (str, int, float, bool, type(None))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _public_class_path(cls: type) -> str:
    """The shortest importable path users see: ``coalign.heads.X`` rather than ``coalign.heads.global_alignment.X``."""
    module = cls.__module__
    parts = module.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        try:
            mod = __import__(parent, fromlist=["_"])
        except ImportError:  # pragma: no cover - parent packages always import
            continue
        if getattr(mod, cls.__name__, None) is cls:
            return f"{parent}.{cls.__name__}"
    return _class_path(cls)


def register_component(cls: T) -> T:
    """Class decorator: allow ``cls`` to be named in a spec (config.json, hparams, YAML)."""
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise TypeError(f"register_component expects a Component subclass, got {cls!r}")
    for key in (_class_path(cls), cls.__name__):
        if key in _COMPONENTS and _COMPONENTS[key] is not cls:
            raise ValueError(f"component name {key!r} is already registered by {_COMPONENTS[key]!r}")
        _COMPONENTS[key] = cls
    return cls


def list_components(base: type | None = None) -> list[str]:
    """Public class paths of the registered components, optionally only subclasses of ``base``."""
    seen = {cls for cls in _COMPONENTS.values() if base is None or issubclass(cls, base)}
    return sorted(_public_class_path(cls) for cls in seen)


def _lookup(class_path: str) -> type:
    if class_path in _COMPONENTS:
        return _COMPONENTS[class_path]
    short = class_path.rsplit(".", 1)[-1]
    cls = _COMPONENTS.get(short)
    if cls is not None and class_path in (short, _public_class_path(cls), _class_path(cls)):
        return cls
    raise ValueError(
        f"{class_path!r} is not a registered coalign component; a config may only name registered ones: "
        f"{', '.join(list_components())}"
    )


def build_component(spec: Any, base: type | None = None) -> Any:
    """Build a component from its spec (or return it unchanged if it is already an object).

    Args:
        spec: ``{"class_path": str, "init_args": dict}`` or an already built component.
        base: if given, the built object must be an instance of this class.

    Raises:
        ValueError: the spec is malformed or names an unregistered class.
        TypeError: the class is not a subclass of ``base``.
    """
    if isinstance(spec, Component) or spec is None:
        obj = spec
    else:
        if hasattr(spec, "as_dict"):  # a jsonargparse Namespace
            spec = spec.as_dict()
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise ValueError(f"expected a component spec {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}")
        unknown = set(spec) - {"class_path", "init_args"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in component spec for {spec['class_path']!r}")
        cls = _lookup(spec["class_path"])
        init_args = dict(spec.get("init_args") or {})
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            bad = sorted(set(init_args) - set(params))
            if bad:
                raise ValueError(
                    f"{spec['class_path']} got unknown init_args {bad}; valid: {sorted(set(params) - {'self'})}"
                )
        for name, value in init_args.items():
            if isinstance(value, dict) and "class_path" in value:
                init_args[name] = build_component(value)
        obj = cls(**init_args)
    if base is not None and obj is not None and not isinstance(obj, base):
        raise TypeError(f"{type(obj).__name__} is not a {base.__name__}")
    return obj


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, Component):
        return value.spec()
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, where) for k, v in value.items()}
    raise TypeError(
        f"{where}: argument value {value!r} of type {type(value).__name__} cannot be stored in a JSON spec; "
        "components must be built from names and numbers"
    )


class Component(nn.Module):
    """Base of every pluggable part. Records its constructor arguments to describe itself as a spec."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_spec", False):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self: Component, *args: Any, **kw: Any) -> None:
            if "_spec_cls" not in self.__dict__:  # outermost constructor only
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop("self", None)
                for name, param in signature.parameters.items():
                    if param.kind is param.VAR_KEYWORD:
                        arguments.update(arguments.pop(name, {}))
                    elif param.kind is param.VAR_POSITIONAL:
                        arguments.pop(name, None)
                self.__dict__["_spec_cls"] = type(self)
                self.__dict__["_spec_args"] = arguments
            init(self, *args, **kw)

        wrapped._records_spec = True  # type: ignore[attr-defined]
        cls.__init__ = wrapped  # type: ignore[method-assign]

    def spec(self) -> dict[str, Any]:
        """The JSON spec ``{"class_path", "init_args"}`` that rebuilds this component."""
        cls = self.__dict__.get("_spec_cls", type(self))
        args = self.__dict__.get("_spec_args", {})
        return {
            "class_path": _public_class_path(cls),
            "init_args": {k: _to_json(v, cls.__name__ + "." + k) for k, v in args.items()},
        }


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Function decorator: register a model constructor ``fn(pretrained=False, **overrides) -> CoAlign``."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models, filtered by a shell-style pattern (``"coalign_clip*"``)."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def get_model_fn(name: str) -> Callable[..., Any]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]
