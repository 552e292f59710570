"""Hub checkpoints: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for ``CoAlign``.

A checkpoint folder holds::

    config.json         {"format": "coalign", "version", "model": <CoAlign.config()>, "preprocess", "card"}
    model.safetensors   every weight of the model (loaded strictly: a missing or unexpected key raises)
    assets/             files a backbone needs besides weights (its tokenizer)
    README.md           the model card: Hub metadata (pipeline tag, base model, eval results) + training facts

Loading builds the model from ``config.json`` through the component registry (only registered classes may be
named), so a full checkpoint never triggers a download of base backbone weights it would overwrite, and nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, snapshot_download
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
        self._write_checkpoint(Path(save_directory), source=str(save_directory))

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

    def _write_checkpoint(self, folder: Path, source: str | None) -> None:
        """config.json, the weights, the backbone's assets and the model card (whose usage snippet loads
        ``source``: the folder after ``save_pretrained``, the repo id after ``push_to_hub``)."""
        config = {
            "format": FORMAT,
            "version": __version__,
            "model": self.config(),
            "preprocess": self.preprocess.config(),
            "card": self.card_info,
        }
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
        save_model(self, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        assets = folder / "assets"
        assets.mkdir(exist_ok=True)
        self.backbone.save_assets(assets)
        self.generate_model_card(source=source).save(folder / "README.md")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        config: dict | None = None,
        commit_message: str = "Push model using huggingface_hub.",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Upload the model to the Hub repo ``repo_id`` (created if missing) in one commit; returns the commit URL.

        The model card's usage snippet names the repo id the Hub resolved (``"name"`` becomes ``"user/name"``).
        """
        if config is not None:
            raise TypeError("push_to_hub takes no config: CoAlign writes config.json from the model itself")
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            self._write_checkpoint(folder, source=repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=folder,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns,
            )

    def generate_model_card(self, *args: Any, source: str | None = None, **kwargs: Any) -> ModelCard:
        """The model card: Hub metadata (library, pipeline tag, license, base model, tags, datasets, eval results)
        and a README with usage, training facts, metrics, the configuration and the citation.

        ``card_info`` keys read: ``name``, ``license``, ``tags``, ``datasets`` (Hub dataset ids),
        ``training_data`` (free text), ``training`` (facts of the run, written by ``ExportPretrained``),
        ``metrics`` (``"<benchmark>[/<subset>]/<metric>"`` -> %), ``metric_splits`` (benchmark -> split) and
        ``split`` (the split of metrics whose benchmark has none).
        """
        info = self.card_info or {}
        metrics = {str(k): _number(k, v) for k, v in (info.get("metrics") or {}).items()}
        splits = dict(info.get("metric_splits") or {})
        default_split = info.get("split")
        architecture = info.get("name")
        title = source.rstrip("/").split("/")[-1] if source and _is_hub_id(source) else architecture
        title = title or "coalign model"
        base_model = self.hub_base_model()
        datasets = [str(d) for d in info.get("datasets") or []]
        ordered = sorted(metrics, key=metric_sort_key)
        results = [r for k in ordered if (r := _eval_result(k, metrics[k], splits, default_split)) is not None]
        data = ModelCardData(
            model_name=title,
            library_name="coalign",
            pipeline_tag=PIPELINE_TAG,
            license=info.get("license") or DEFAULT_LICENSE,
            base_model=base_model,
            tags=list(dict.fromkeys([*TAGS, *(info.get("tags") or [])])),
            datasets=datasets or None,
            eval_results=results or None,
        )
        body = [f"# {title}", ""]
        body += [
            "A coalign model for composed image retrieval: a reference image plus a modification text retrieves the "
            "target image. The architecture is CoAlign (Hybrid Contextual Alignment) from *Automatic Synthesis of "
            'High-Quality Triplet Data for Composed Image Retrieval* (arXiv 2507.05970), see "Citation".',
            "",
        ]
        facts = []
        if architecture and architecture != title:
            facts.append(f"- Architecture: `{architecture}`")
        if base_model:
            facts.append(f"- Base model: [{base_model}](https://huggingface.co/{base_model})")
        body += [*facts, ""] if facts else []
        load = json.dumps(source) if source else "folder_or_repo_id"
        body += [
            "## Usage",
            "",
            "```python",
            "from coalign import CoAlign",
            "",
            f"model = CoAlign.from_pretrained({load})",
            'queries = model.encode_queries([reference_image], ["make it red"])',
            "targets = model.encode_targets(gallery_images)",
            "scores = model.similarity(queries, targets)  # [num_queries, num_gallery]",
            "```",
            "",
            "## Training",
            "",
            *_training_lines(info, datasets),
            "",
            "## Evaluation",
            "",
        ]
        if metrics:
            body += ["| benchmark | split | metric (as in metrics.json) | value (%) |", "|---|---|---|---|"]
            for key in ordered:
                benchmark = split_metric_key(key)[0]
                split = splits.get(benchmark) or default_split or "not recorded"
                label = BENCHMARKS.get(benchmark, benchmark) if benchmark else "-"
                body.append(f"| {label} | {split} | {key} | {metrics[key]:.2f} |")
        else:
            body.append("Not evaluated yet.")
        model_config = {k: v for k, v in self.config().items() if k not in ("optimizer", "lr_scheduler")}
        body += [
            "",
            "## Configuration",
            "",
            "```json",
            json.dumps(model_config, indent=2),
            "```",
            "",
            "## Citation",
            "",
            "```bibtex",
            CITATION,
            "```",
        ]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")

    def hub_base_model(self) -> str | None:
        """The Hub id the weights started from: ``init_from`` when it is a Hub repo, else the backbone's source
        (e.g. ``Salesforce/blip2-itm-vit-g``); None for a backbone trained from scratch or a local source."""
        init_from = self.config().get("init_from")
        if isinstance(init_from, str) and init_from not in list_models() and _is_hub_id(init_from):
            return init_from
        name = getattr(self.backbone, "model_name", None)
        return name if isinstance(name, str) and _is_hub_id(name) else None


#: the Hub's pipeline tag: CoAlign turns (image + text) queries and gallery images into embeddings compared by
#: cosine similarity; the Hub has no composed-retrieval task, and image-feature-extraction is the task of models
#: whose output is an image embedding used for retrieval
PIPELINE_TAG = "image-feature-extraction"
#: the project's own license (pyproject.toml); ``card_info["license"]`` overrides it (mind the base model's)
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["coalign", "composed-image-retrieval", "image-retrieval", "pytorch", "lightning"]
#: metric prefix -> the benchmark's name on the card
BENCHMARKS = {
    "cirr": "CIRR",
    "circo": "CIRCO",
    "fashioniq": "FashionIQ",
    "shapes": "Shapes",
    "triplets": "custom triplets",
}
CITATION = """@article{li2025automatic,
  title   = {Automatic Synthesis of High-Quality Triplet Data for Composed Image Retrieval},
  author  = {Li, Haiwen and Liu, Delong and Hou, Zhaohui and Zhao, Zhicheng and Su, Fei},
  journal = {arXiv preprint arXiv:2507.05970},
  year    = {2025}
}"""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_AT_K = re.compile(r"(.+?)@(\d+)")


def _is_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def split_metric_key(key: str) -> tuple[str | None, str | None, str]:
    """``"fashioniq/dress/R@10"`` -> ``("fashioniq", "dress", "R@10")``; ``"R@1"`` -> ``(None, None, "R@1")``."""
    parts = key.split("/")
    if len(parts) == 1:
        return None, None, key
    return parts[0], "/".join(parts[1:-1]) or None, parts[-1]


def metric_sort_key(key: str) -> tuple:
    """Benchmark, subset, then R@K by K, other @K metrics by name and K, then the rest by name."""
    benchmark, subset, name = split_metric_key(key)
    match = _AT_K.fullmatch(name)
    if match is None:
        rank = (2, "", 0, name)
    else:
        family, k = match.group(1), int(match.group(2))
        rank = (0 if family == "R" else 1, family, k, name)
    return (benchmark or "", subset or "", *rank)


def _eval_result(key: str, value: float, splits: dict[str, str], default_split: str | None) -> EvalResult | None:
    benchmark, subset, name = split_metric_key(key)
    if benchmark is None:  # no benchmark to name the result by: on the card's table only
        return None
    return EvalResult(
        task_type=PIPELINE_TAG,
        task_name="Composed Image Retrieval",
        dataset_type=benchmark,
        dataset_name=BENCHMARKS.get(benchmark, benchmark),
        dataset_config=subset,
        dataset_split=splits.get(benchmark) or default_split,
        metric_type=name,
        metric_name=name,
        metric_value=round(value, 2),
    )


def _training_lines(info: dict[str, Any], datasets: list[str]) -> list[str]:
    lines = []
    if info.get("training_data"):
        lines += [str(info["training_data"]), ""]
    if datasets:
        lines += [f"Datasets: {', '.join(datasets)}", ""]
    run = info.get("training") or {}
    rows = [
        ("steps run", run.get("steps")),
        ("weights exported", run.get("exported")),
        ("epochs", run.get("epochs")),
        ("resumed from", run.get("resumed_from")),
        ("DataModule", run.get("datamodule")),
        ("training examples", run.get("train_size")),
        ("wall time (this run)", _duration(run.get("wall_time_s"))),
        ("precision", run.get("precision")),
        ("device", run.get("device")),
    ]
    rows = [(k, v) for k, v in rows if v is not None]
    if rows:
        lines += ["| fact | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    elif not lines:
        lines.append("Not recorded (no facts of a training run: this model was not exported by a `coalign fit`).")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _number(key: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"card_info['metrics'][{key!r}] = {value!r} is not a number; metrics are percentages")
    return float(value)


def _duration(seconds: Any) -> str | None:
    if seconds is None:
        return None
    seconds = float(seconds)
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d} ({seconds:.1f} s)"
