"""Optimizer and scheduler factories that can be stored as JSON specs (hparams, config.json).

A factory is described as ``{"class_path": "torch.optim.AdamW", "init_args": {...}}``. Only classes from
``torch.optim`` and ``torch.optim.lr_scheduler``, and the schedules defined here (:class:`WarmupCosine`), may be
named, so a stored spec can never import arbitrary code.

A schedule's length is the run's: ``total_steps: null`` (OneCycleLR, WarmupCosine) or ``T_max: null``
(CosineAnnealingLR) is filled in by :func:`build_scheduler` from ``trainer.estimated_stepping_batches`` when
``CoAlign.configure_optimizers`` runs, so it always matches ``max_steps`` / ``max_epochs``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["OptimizerFactory", "WarmupCosine", "build_optimizer_callable", "build_scheduler", "optimizer_spec"]

_ALLOWED_MODULES = ("torch.optim", "torch.optim.lr_scheduler")


class WarmupCosine(LRScheduler):
    """Linear warm-up from ``lr / warmup`` to ``lr``, then a cosine decay to ``min_lr_ratio * lr`` at
    ``total_steps``; stepped once per optimizer step. Past ``total_steps`` the rate stays at its minimum.

    The factor at step ``s`` (0-based) with ``w`` warm-up steps and ``T`` total steps is ``(s + 1) / w`` for
    ``s < w``, else ``m + (1 - m) * (1 + cos(pi * min(1, (s - w) / (T - w)))) / 2``.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: the schedule's length in optimizer steps; None is filled in from the trainer (see
            :func:`build_scheduler`).
        warmup_steps: warm-up length: a number of steps (an int >= 0) or a fraction of ``total_steps`` (a float in
            [0, 1)).
        min_lr_ratio: the final rate as a fraction of the initial one.
        last_epoch: the index of the last step (-1: start).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int | float = 0.05,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ):
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"WarmupCosine needs total_steps >= 1, got {total_steps} (null is filled in from the trainer's "
                "max_steps/max_epochs by CoAlign.configure_optimizers)"
            )
        if isinstance(warmup_steps, float) and not 0 <= warmup_steps < 1:
            raise ValueError(f"warmup_steps as a fraction must be in [0, 1), got {warmup_steps}")
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"need warmup_steps >= 0 and min_lr_ratio in [0, 1], got {warmup_steps}, {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = warmup_steps
        self.warmup = round(warmup_steps * total_steps) if isinstance(warmup_steps, float) else int(warmup_steps)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the initial learning rate after ``step`` steps."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


#: coalign's own schedules a spec may name (besides torch.optim's)
_OWN = {"coalign._optim.WarmupCosine": WarmupCosine}


def _resolve(class_path: str) -> type:
    if class_path in _OWN:
        return _OWN[class_path]
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
        own = {cls: path for path, cls in _OWN.items()}
        if self.cls in own:
            path = own[self.cls]
        elif issubclass(self.cls, torch.optim.lr_scheduler.LRScheduler):
            path = f"torch.optim.lr_scheduler.{self.cls.__name__}"
        else:
            path = f"torch.optim.{self.cls.__name__}"
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


#: the length argument of each kind of schedule that build_scheduler fills in when it is None
_LENGTH_ARGS = ("total_steps", "T_max")


def build_scheduler(factory, optimizer: torch.optim.Optimizer, total_steps: Callable[[], float]):
    """``factory(optimizer)`` with the schedule's length taken from the run when the spec leaves it None.

    Args:
        factory: a scheduler factory (from :func:`build_optimizer_callable`).
        optimizer: the optimizer to schedule.
        total_steps: returns the run's optimizer steps (``trainer.estimated_stepping_batches``); called only when a
            length is missing.

    Raises:
        ValueError: the length is missing and the run has no finite number of steps.
    """
    if not isinstance(factory, OptimizerFactory):
        return factory(optimizer)
    accepted = inspect.signature(factory.cls).parameters
    args = factory.init_args
    # OneCycleLR's other way to give its length
    given_by_epochs = args.get("epochs") is not None and args.get("steps_per_epoch") is not None
    missing = [k for k in _LENGTH_ARGS if k in accepted and args.get(k) is None and not given_by_epochs]
    if not missing:
        return factory(optimizer)
    steps = total_steps()
    if not math.isfinite(steps) or steps < 1:
        raise ValueError(
            f"{factory.cls.__name__}.{missing[0]} is null and the run's length is unknown ({steps} steps): set "
            "trainer.max_steps (or max_epochs with a sized training loader), or give the schedule its length"
        )
    return OptimizerFactory(factory.cls, {**args, **dict.fromkeys(missing, int(steps))})(optimizer)
