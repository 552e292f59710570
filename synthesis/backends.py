"""The four pluggable model roles of the synthesis pipeline, their registry, and the panel-grid geometry.

Each stage talks to its model through one small abstract interface, so a different model family (or a
procedural world with exact ground truth) plugs in without touching the stages:

==================  ==============================================================  ======================
interface           call                                                            used by
==================  ==============================================================  ======================
:class:`ChatBackend`    ``generate(conversations, seeds, num_edits) -> list[str]``  prompts: one group JSON
:class:`RenderBackend`  ``render(panels, seeds, panel_size) -> list[Image]``        render: one composite
:class:`ScorerBackend`  ``score(images, captions) -> list[float]``                  filter ``clip``
:class:`JudgeBackend`   ``judge(references, targets, texts) -> list[float]``        filter ``judge``
==================  ==============================================================  ======================

Every backend also has optional ``setup(device)`` / ``teardown()`` hooks (load / drop models; called only when a
stage has work left) and ``settings() -> dict`` (JSON: what determines its outputs; recorded in the stage's
settings file, so resuming with other settings is refused, and shown on the dataset card).

**Selecting one.** The synthesis YAML names a backend per stage with ``backend: {class_path, init_args}``
(``prompts.backend``, ``render.backend``, ``filter.clip.backend``, ``filter.judge.backend``); ``null`` (the default)
is the Hugging Face implementation built from the stage's ``model`` fields (:mod:`.hf_backends`). A config may only
name a *registered* backend (:func:`register_backend`): a short class name or its full module path. A full path
under ``coalign.`` whose module is not imported yet is imported once (the project's own code); any other name is
refused with the list of registered backends.

**The group JSON** a :class:`ChatBackend` answers with (parsed and validated by the prompts stage)::

    {"source": "<caption of the source scene>",
     "edits": [{"caption": "<caption of the edited scene>",
                "forward": "<modification text: source -> this edit>",
                "backward": "<modification text: this edit -> source>"},
               ...],                                   # exactly num_edits items
     "cross": [{"from": i, "to": j, "text": "<modification text: edit i -> edit j>"}, ...]}   # optional

``i`` and ``j`` index ``edits`` (0-based, ``i != j``). A group is rendered as ``1 + num_edits`` panels: the
source first, then the edits in order.

**The grid.** :func:`grid_shape` gives the layout of ``n`` panels (``1x2`` for 2, ``2x2`` for 3-4, ``2x3`` for 5-6,
``3x3`` for 7-9: ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)``); panels fill it row by row, each
``panel_size`` square, so a composite is ``cols * panel_size`` wide and ``rows * panel_size`` high (unused cells
stay empty). :func:`split_grid` cuts a composite back into its panels.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from PIL import Image

__all__ = [
    "Backend",
    "ChatBackend",
    "RenderBackend",
    "ScorerBackend",
    "JudgeBackend",
    "register_backend",
    "resolve_backend",
    "build_backend",
    "list_backends",
    "grid_shape",
    "split_grid",
    "make_grid",
]

_BACKENDS: dict[str, type] = {}
T = TypeVar("T", bound=type)


class Backend(ABC):  # noqa: B024 (the four roles below add the abstract call)
    """What every backend shares: optional lifecycle hooks and the settings that determine its outputs."""

    def setup(self, device: torch.device) -> None:  # noqa: B027 (optional hook)
        """Load models onto ``device``; called only when the stage has work left."""

    def teardown(self) -> None:  # noqa: B027 (optional hook)
        """Drop models (called after :meth:`setup`, also on errors)."""

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings that determine the outputs (resume checks, dataset card)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}"}


class ChatBackend(Backend):
    """Writes one group description (the JSON of the module docstring) per conversation."""

    @abstractmethod
    def generate(
        self, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int], num_edits: int
    ) -> list[str]:
        """One JSON text answer per conversation, sampled with its seed.

        Args:
            conversations: chat messages (``{"role", "content"}``) asking for one group each.
            seeds: one sampling seed per conversation; the same seed must give the same answer.
            num_edits: edits per group (group size - 1).
        """


class RenderBackend(Backend):
    """Draws each group as ONE composite image, a grid of its panels (see :func:`grid_shape`)."""

    @abstractmethod
    def render(self, panels: Sequence[Sequence[str]], seeds: Sequence[int], panel_size: int) -> list[Image.Image]:
        """One composite per group.

        Args:
            panels: per group, the captions of its panels: the source first, then each edit. A one-caption list
                asks for a single image (the "separately seeded renders" ablation).
            seeds: one seed per group.
            panel_size: side of each square panel in pixels.

        Returns:
            Per group, an image ``cols * panel_size`` wide and ``rows * panel_size`` high,
            ``(rows, cols) = grid_shape(len(captions))``.
        """


class ScorerBackend(Backend):
    """Caption-image agreement (the CLIP-score role)."""

    @abstractmethod
    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        """One score per ``(image, caption)`` pair, higher is better (CLIP: cosine of the embeddings)."""

    def embeddings(self, images: Sequence[Image.Image], captions: Sequence[str]) -> tuple | None:
        """Optional: L2-normalisable ``(image [N, D], caption [N, D])`` embedding tensors, or None.

        When a scorer provides them, the ``clip`` filter also checks image-image similarity and the direction of
        the change; otherwise only the caption scores and margins.
        """
        return None


class JudgeBackend(Backend):
    """Judges whether a target is its reference changed as a text says."""

    @abstractmethod
    def judge(
        self, references: Sequence[Image.Image], targets: Sequence[Image.Image], texts: Sequence[str]
    ) -> list[float]:
        """Per triple, the probability in [0, 1] that ``target`` is ``reference`` changed as ``text`` says."""


# -- registry --------------------------------------------------------------------------------------------------
def _full_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_backend(cls: T) -> T:
    """Class decorator: allow a :class:`Backend` subclass to be named by ``class_path`` in a synthesis config."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"register_backend expects a Backend subclass, got {cls!r}")
    for key in (_full_path(cls), cls.__name__):
        if key in _BACKENDS and _BACKENDS[key] is not cls:
            raise ValueError(f"backend name {key!r} is already registered by {_BACKENDS[key]!r}")
        _BACKENDS[key] = cls
    return cls


def list_backends(kind: type | None = None) -> list[str]:
    """Full class paths of the registered backends, optionally only subclasses of ``kind``."""
    return sorted({_full_path(c) for c in _BACKENDS.values() if kind is None or issubclass(c, kind)})


def resolve_backend(class_path: str, kind: type = Backend) -> type:
    """The registered class named ``class_path`` (short name or full path), which must subclass ``kind``.

    Raises:
        ValueError: an unregistered name, or a backend of another kind; the message lists the registered ones.
    """
    if class_path not in _BACKENDS and class_path.startswith("coalign.") and "." in class_path:
        module = class_path.rsplit(".", 1)[0]
        try:  # the project's own module that registers it on import (e.g. coalign.synthesis.shapes_world)
            importlib.import_module(module)
        except ImportError:
            pass
    cls = _BACKENDS.get(class_path)
    choices = ", ".join(list_backends(kind)) or "none"
    if cls is None:
        raise ValueError(
            f"backend class_path {class_path!r} is not a registered {kind.__name__}; a synthesis config may only "
            f"name registered backends ({choices}). Register yours with @register_backend and import its module."
        )
    if not issubclass(cls, kind):
        raise ValueError(f"backend {class_path!r} is a {cls.__mro__[1].__name__}, not a {kind.__name__} ({choices})")
    return cls


def build_backend(class_path: str, init_args: dict[str, Any] | None, kind: type[Backend]) -> Backend:
    """Instantiate the registered backend ``class_path`` with ``init_args``; errors name the backend."""
    cls = resolve_backend(class_path, kind)
    try:
        return cls(**(init_args or {}))
    except TypeError as err:
        raise ValueError(f"backend {class_path!r}: bad init_args {sorted(init_args or {})}: {err}") from err


# -- grid geometry ---------------------------------------------------------------------------------------------
def grid_shape(n_panels: int) -> tuple[int, int]:
    """``(rows, cols)`` of the grid holding ``n_panels`` panels: 1x1, 1x2, 2x2 (3-4), 2x3 (5-6), 3x3 (7-9), ..."""
    if n_panels < 1:
        raise ValueError(f"a grid needs at least one panel, got {n_panels}")
    cols = math.ceil(math.sqrt(n_panels))
    return math.ceil(n_panels / cols), cols


def make_grid(panels: Sequence[Image.Image], fill: str = "black") -> Image.Image:
    """Paste equally sized panels row by row into the :func:`grid_shape` grid (the inverse of :func:`split_grid`)."""
    rows, cols = grid_shape(len(panels))
    width, height = panels[0].size
    if any(p.size != (width, height) for p in panels):
        raise ValueError(f"make_grid needs panels of one size, got {sorted({p.size for p in panels})}")
    grid = Image.new("RGB", (cols * width, rows * height), fill)
    for k, panel in enumerate(panels):
        grid.paste(panel.convert("RGB"), ((k % cols) * width, (k // cols) * height))
    return grid


def split_grid(image: Image.Image, n_panels: int, border: float = 0.0) -> list[Image.Image]:
    """Cut a composite into its ``n_panels`` panels (row by row), trimming a border from each.

    Args:
        image: the composite, ``W`` wide and ``H`` high, laid out as :func:`grid_shape` says.
        n_panels: panels drawn in it (cells beyond them are ignored).
        border: fraction of the cell width ``W // cols`` trimmed from every edge of each panel (dividers and
            frames that composite renders often draw).

    Returns:
        The panels, each ``(W // cols - 2b) x (H // rows - 2b)`` with ``b = round(border * (W // cols))``.
    """
    rows, cols = grid_shape(n_panels)
    width, height = image.size
    cell_w, cell_h = width // cols, height // rows
    b = round(border * cell_w)
    if cell_w - 2 * b <= 0 or cell_h - 2 * b <= 0:
        raise ValueError(f"border {border} leaves nothing of a {width}x{height} composite of {rows}x{cols} panels")
    return [
        image.crop((c * cell_w + b, r * cell_h + b, (c + 1) * cell_w - b, (r + 1) * cell_h - b))
        for r, c in (divmod(k, cols) for k in range(n_panels))
    ]
