"""One whole benchmark evaluation: check files, encode (or load) the gallery, rank every query, write results.

:func:`evaluate` is what ``coalign evaluate`` runs; it uses the same :func:`~coalign.evaluation.evaluation_step`
as the LightningModule's validation and test steps, so both give the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io import atomic_write_json, format_table
from .cache import cached_gallery
from .engine import evaluation_step
from .pictures import collect_examples, draw_examples, picture_title

__all__ = ["EvaluationResult", "evaluate", "write_results", "result_table"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EvaluationResult:
    """What one evaluation produced.

    Attributes:
        metrics: percentages keyed like ``"cirr/R@1"`` (empty for a split without labels).
        protocol: the options that produced them, keyed ``"protocol/<name>"``.
        rankings: upload-format objects by file name (``cirr_val_recall.json``, ...).
        files: paths written (when an output folder was given).
    """

    metrics: dict[str, float]
    protocol: dict[str, Any]
    rankings: dict[str, dict]
    files: list[Path] = field(default_factory=list)


def evaluate(
    model,
    datamodule,
    split: str,
    output_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    gallery_dtype: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate ``model`` on one split of a benchmark DataModule.

    Args:
        model: a ``CoAlign`` (or anything with ``encode_queries``, ``encode_targets``, ``similarity``,
            ``device``, ``preprocess``), already on its device.
        datamodule: a FashionIQ / CIRR / CIRCO DataModule (any ``BenchmarkDataModule``); it is connected to
            ``model.preprocess`` unless it was given its own ``image_transform``.
        split: the split to evaluate (e.g. ``"val"``, ``"test1"``).
        output_dir: where to write ``metrics.json`` (labelled splits) and the ranking files; None writes nothing.
        cache_dir: folder for gallery feature caches (safetensors); None encodes without caching.
        gallery_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` storage for gallery features; None keeps
            the model's dtype.
        model_name: how the model is named in ``metrics.json``.
        progress: show progress bars.
    """
    if gallery_dtype is not None and gallery_dtype not in _DTYPES:
        raise ValueError(f"gallery_dtype must be one of {', '.join(_DTYPES)}, got {gallery_dtype!r}")
    # parse annotations and check every image before anything is encoded
    data = datamodule.prepare_split(split)
    datamodule.connect(model.preprocess)
    was_training = model.training
    model.eval()
    try:
        entries = data.gallery
        gallery, cache_file, hit = cached_gallery(
            model,
            datamodule.gallery_dataloader(split),
            cache_dir,
            entries,
            name=datamodule.benchmark,  # not the split: CIRCO val and test share one gallery file
            dtype=_DTYPES.get(gallery_dtype),
            transform=datamodule.image_transform,
            progress=progress,
        )
        evaluator = datamodule.build_evaluator(split)
        evaluator.check_gallery(gallery.ids)
        loader = datamodule.query_dataloader(split)
        examples: list[dict] = []
        for batch in tqdm(loader, desc=f"ranking {datamodule.benchmark} {split} queries", disable=not progress):
            index, scores = evaluation_step(model, batch, gallery, evaluator)
            collect_examples(examples, batch, index, scores, gallery.ids)
        metrics = evaluator.compute()
        rankings = datamodule.ranking_files(split, evaluator)
    finally:
        model.train(was_training)
    options = {
        **datamodule.protocol(),
        "split": split,
        "model": model_name or type(model).__name__,
        "gallery_size": len(gallery),
        "queries": len(data.queries),
        "gallery_dtype": gallery_dtype or str(gallery.features.embedding.dtype).replace("torch.", ""),
        "gallery_cache": "hit" if hit else ("written" if cache_file else "off"),
        "image_transform": _describe(datamodule.image_transform),
    }
    result = EvaluationResult(metrics, {f"protocol/{k}": v for k, v in options.items()}, rankings)
    if output_dir is not None:
        result.files = write_results(result, output_dir, has_labels=data.has_labels)
        if data.has_labels and metrics:  # a picture of a few varied queries (the true target shown when missed)
            picture = Path(output_dir) / "retrieval_examples.png"
            transform = datamodule.image_transform
            title = picture_title(f"{datamodule.benchmark} {split}", metrics)
            gallery_images = getattr(datamodule.gallery_dataloader(split), "dataset", None)
            mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
            if mean is not None and draw_examples(examples, gallery_images, mean, std, picture, title) is not None:
                result.files.append(picture)
    return result


def _describe(transform) -> str:
    config = getattr(transform, "config", None)
    return json.dumps(config(), sort_keys=True) if callable(config) else type(transform).__name__


def write_results(result: EvaluationResult, output_dir: str | Path, has_labels: bool = True) -> list[Path]:
    """Write ``metrics.json`` (labelled splits only: a test split has no metrics) and every ranking file."""
    out = Path(output_dir)
    written = []
    if has_labels:
        atomic_write_json(out / "metrics.json", {**result.metrics, **result.protocol}, indent=2)
        written.append(out / "metrics.json")
    for name, obj in result.rankings.items():
        atomic_write_json(out / name, obj, compact=True)  # compact: the servers cap uploads at 5 MB
        written.append(out / name)
    return written


def result_table(result: EvaluationResult) -> str:
    """The metrics as a two-column text table, followed by the protocol options."""
    return format_table(result.metrics, extra=result.protocol)
