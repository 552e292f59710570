"""Hub checkpoints: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for ``CoAlign``.

A checkpoint folder holds::

    config.json         {"format": "coalign", "version", "model": <CoAlign.config()>, "preprocess", "card"}
    model.safetensors   every weight of the model (loaded strictly: a missing or unexpected key raises)
    assets/             files a backbone needs besides weights (its tokenizer)
    README.md           the model card (training data and metrics when known)

Loading builds the model from ``config.json`` through the component registry (only registered classes may be
named), so a full checkpoint never triggers a download of base backbone weights it would overwrite, and nothing
is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_model, save_model

from ._version import __version__
from .io import atomic_write_text
from .registry import get_model_fn, list_models

__all__ = ["HubMixinOverrides", "resolve_checkpoint_folder"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "coalign"


def resolve_checkpoint_folder(
    source: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder, or a Hub repo id downloaded with ``snapshot_download`` (config, weights, assets only)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; from_pretrained expects a folder written by save_pretrained")
        return path
    if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"checkpoint folder {source} does not exist")
    return Path(
        snapshot_download(
            str(source),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "assets/*", "assets/**/*", "README.md"],
        )
    )


#: CoAlign arguments that act only when training starts; ``from_pretrained`` ignores them
TRAINING_ONLY = frozenset({"init_from"})
#: the largest integer a config.json may hold (widths, depths, lengths): a crafted config cannot allocate terabytes
MAX_SIZE = 1 << 20


def _check_sizes(value: Any, path: Path, where: str = "model") -> None:
    """Refuse a config whose integers are beyond any real architecture's (a crafted ``config.json``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_sizes(item, path, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_sizes(item, path, f"{where}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and not -MAX_SIZE <= value <= MAX_SIZE:
        raise ValueError(f"{path}: {where} = {value} is outside [-{MAX_SIZE}, {MAX_SIZE}]; this is no coalign model")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a coalign checkpoint: it has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise ValueError(f'{path} is not a coalign config (expected "format": "{FORMAT}" and a "model" entry)')
    return config


class HubMixinOverrides:
    """Methods that replace ``PyTorchModelHubMixin``'s defaults for ``CoAlign`` (listed first in its bases)."""

    # huggingface_hub records constructor arguments for its own config.json; ours is written by
    # _save_pretrained from the component specs instead, so that nothing is silently dropped.
    _hub_mixin_config = None

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        config = {
            "format": FORMAT,
            "version": __version__,
            "model": self.config(),
            "preprocess": self.preprocess.config(),
            "card": self.card_info,
        }
        atomic_write_text(save_directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        save_model(self, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        assets = save_directory / "assets"
        assets.mkdir(exist_ok=True)
        self.backbone.save_assets(assets)
        self.generate_model_card().save(save_directory / "README.md")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str = "cpu",
        strict: bool = True,
        **overrides: Any,
    ):
        """Load a model from a folder written by ``save_pretrained`` or from a Hub repo id.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id (``"user/coalign-cirr"``).
            revision: Hub revision (branch, tag or commit).
            map_location: device to load the weights on.
            strict: raise on missing or unexpected weights (default; turn off only to debug).
            overrides: CoAlign arguments replacing those of ``config.json`` (e.g. ``rerank_top_k=50``).
        """
        folder = resolve_checkpoint_folder(
            pretrained_model_name_or_path, revision, cache_dir, force_download, token, local_files_only
        )
        config = read_config(folder)
        # loading is inert: options that act at training time (init_from would load other weights, or download
        # base weights) are ignored, whatever a downloaded config.json says
        kwargs = {k: v for k, v in dict(config["model"]).items() if k not in TRAINING_ONLY}
        _check_sizes(kwargs, folder / CONFIG_NAME)
        unknown = set(overrides) - set(kwargs)
        if unknown:
            raise TypeError(f"unknown CoAlign arguments {sorted(unknown)}")
        kwargs.update(overrides)
        model = cls(**kwargs)
        if (folder / "assets").is_dir():
            model.backbone.load_assets(folder / "assets")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
        try:
            missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
        except RuntimeError as err:  # shape mismatch
            raise RuntimeError(f"the weights in {weights} do not fit the model of its config.json: {err}") from err
        except Exception as err:  # safetensors' own error for a truncated or corrupt file names no file
            raise ValueError(
                f"{weights} is not a readable safetensors file ({type(err).__name__}: {err}); save or download it again"
            ) from None
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"weights in {weights} do not match the model: {len(missing)} missing keys {sorted(missing)[:5]}, "
                f"{len(unexpected)} unexpected keys {sorted(unexpected)[:5]}"
            )
        model.card_info = dict(config.get("card") or {})
        return model.eval()

    def load_weights_from(self, source: str) -> None:
        """Initialise the weights from a registered model name, a checkpoint folder or a Hub id (fine-tuning).

        The architectures must agree, except for a local head the source does not have (the fine-tuning config
        may add one; it starts fresh); every other mismatched or missing weight is listed in the error.
        """
        if source in list_models():
            source_model = get_model_fn(source)()
            source_model.backbone.load_pretrained()
        else:
            source_model = type(self).from_pretrained(source)
        state = source_model.state_dict()
        own = self.state_dict()
        added = "local_head." if source_model.local_head is None and self.local_head is not None else None
        missing = sorted(k for k in set(own) - set(state) if not (added and k.startswith(added)))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            raise RuntimeError(
                f"cannot initialise from {source!r}: its architecture differs ({len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} shape mismatches "
                f"{shapes[:3]}); use the same model configuration as the source"
            )
        with torch.no_grad():
            self.load_state_dict(state, strict=added is None)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        info = self.card_info or {}
        datasets = info.get("datasets") or []
        metrics = info.get("metrics") or {}
        lines = [
            "---",
            "library_name: coalign",
            "tags:",
            "- composed-image-retrieval",
            "- coalign",
            "- image-retrieval",
        ]
        if datasets:
            lines += ["datasets:", *[f"- {d}" for d in datasets]]
        lines += ["---", "", f"# {info.get('name', 'CoAlign model')}", ""]
        lines += [
            "A [coalign](https://github.com/coalign/coalign) model for composed image retrieval: a reference image "
            "plus a modification text retrieves the target image.",
            "",
            "```python",
            "from coalign import CoAlign",
            "",
            'model = CoAlign.from_pretrained("<this repo or folder>")',
            'queries = model.encode_queries([reference_image], ["make it red"])',
            "targets = model.encode_targets(gallery_images)",
            "scores = model.similarity(queries, targets)",
            "```",
            "",
            "## Training data",
            "",
            info.get("training_data", "Not recorded.") if not datasets else ", ".join(datasets),
            "",
            "## Metrics",
            "",
        ]
        if metrics:
            lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in sorted(metrics.items())]]
        else:
            lines.append("Not evaluated yet.")
        lines += [
            "",
            "## Configuration",
            "",
            "```json",
            json.dumps({k: v for k, v in self.config().items() if k not in ("optimizer", "lr_scheduler")}, indent=2),
            "```",
        ]
        return ModelCard("\n".join(lines) + "\n")
