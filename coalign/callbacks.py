"""Lightning callbacks: the retrieval report (metrics table, ``metrics.json``, a picture of results), the export of
a ``save_pretrained`` folder, the embedding writer of ``coalign predict`` and a clean progress bar.

Status lines go through :mod:`logging` (logger ``coalign.callbacks``), from rank zero only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file

from .evaluation.engine import EvaluationOutcome, encode_gallery
from .evaluation.pictures import draw_examples, picture_title
from .io import atomic_write_json, format_table

__all__ = ["RetrievalReport", "ExportPretrained", "EmbeddingWriter", "CleanProgressBar", "best_checkpoint"]

log = logging.getLogger(__name__)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint of the first ``ModelCheckpoint`` that monitors a metric and has saved one, else None."""
    for callback in getattr(trainer, "checkpoint_callbacks", ()):
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            if Path(callback.best_model_path).is_file():
                return callback.best_model_path
    return None


class RetrievalReport(L.Callback):
    """After a validation run (``coalign validate``) or a test run, report the gallery retrieval results.

    Prints a metrics table, writes ``metrics.json`` (percentages) and ``retrieval_examples.png`` (a few queries:
    reference image and text, their top results, the true target framed in green) into ``output_dir``
    (default: the trainer's ``default_root_dir``). On FashionIQ, CIRR and CIRCO it also writes the rankings in
    the official upload formats, so ``coalign test`` on CIRR test1 or CIRCO test yields the files to submit.

    Args:
        output_dir: where to write; None uses ``trainer.default_root_dir``.
        num_examples: queries drawn in the picture.
        top_k: results drawn per query.
    """

    def __init__(self, output_dir: str | None = None, num_examples: int = 6, top_k: int = 5):
        self.output_dir = output_dir
        self.num_examples = num_examples
        self.top_k = top_k

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    @rank_zero_only
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        result: EvaluationOutcome | None = getattr(pl_module, "last_evaluation", None)
        if result is None:
            return
        out = Path(self.output_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, payload in result.upload_files.items():  # benchmarks: rankings in the official upload formats
            atomic_write_json(out / name, payload, compact=True)
            log.info(f"wrote {out / name}")
        metrics = {k: round(float(v), 4) for k, v in result.metrics.items()}
        if not metrics:  # a split without labels (CIRR test1, CIRCO test): upload files only
            return
        log.info("\n" + format_table(metrics, f"{prefix} retrieval ({result.split} split), in %"))
        atomic_write_json(out / "metrics.json", {**metrics, "split": result.split, "stage": prefix}, indent=2)
        pl_module.card_info.setdefault("metrics", {}).update(metrics)
        if result.examples:
            self._picture(result, pl_module, out / "retrieval_examples.png", trainer)

    def _picture(self, result: EvaluationOutcome, pl_module, path: Path, trainer: L.Trainer | None = None) -> None:
        title = picture_title(f"{result.stage} retrieval, {result.split} split", result.metrics)
        preprocess = pl_module.preprocess
        canvas = draw_examples(
            result.examples, result.gallery_images, preprocess.mean, preprocess.std, path, title,
            self.num_examples, self.top_k,
        )  # fmt: skip
        if canvas is not None:
            log.info(f"wrote {path} (true targets framed in green; a missed one in the last column, in red)")
            _log_image(trainer, f"{result.stage}/retrieval_examples", canvas)


def _log_image(trainer: L.Trainer | None, key: str, image) -> None:
    """Hand a PIL picture to the run's logger when it takes images (TensorBoard, W&B and the like)."""
    logger = getattr(trainer, "logger", None)
    if logger is None:
        return
    step = int(getattr(trainer, "global_step", 0))
    if hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger, ...
        logger.log_image(key=key, images=[image], step=step)
        return
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
        array = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # a writable copy
        experiment.add_image(key, array, step)


class ExportPretrained(L.Callback):
    """At the end of ``fit`` (and again after a test run, with its metrics in the model card), write the model
    with ``save_pretrained`` to ``dirpath`` (default ``<default_root_dir>/model``), ready for
    ``CoAlign.from_pretrained``, ``coalign evaluate --model`` and ``coalign index --model``.

    When a ``ModelCheckpoint`` monitors a metric, ``fit`` exports the weights of its best checkpoint, not the last
    ones (the model itself keeps its last weights). Nothing is written under ``fast_dev_run`` (a smoke test never
    replaces an export), nor when no training step ran (0 training batches, ``max_steps: 0``) and the model was not
    loaded from a checkpoint: an untrained model must not pass for a trained one.

    The model card records the facts of the run itself, never the config's intentions: the steps actually run
    (and the step of the exported weights), epochs, the DataModule and its number of training examples, the wall
    time from the start to the end of ``fit``, precision and device; after a test run, the split its metrics
    were measured on.

    Args:
        dirpath: output folder; None uses ``<trainer.default_root_dir>/model``.
        training_data: a description of the training data for the model card.
        license: the model card's license (a Hub license id); None keeps the card's default (``apache-2.0``, the
            project's license). Mind the base model's license.
    """

    def __init__(self, dirpath: str | None = None, training_data: str | None = None, license: str | None = None):
        self.dirpath = dirpath
        self.training_data = training_data
        self.license = license
        self._fit_start: float | None = None
        self._train_facts: dict[str, Any] = {}

    def _skip(self, trainer: L.Trainer, path: Path) -> bool:
        if trainer.fast_dev_run:
            log.info(f"fast_dev_run: did not save the model to {path} (a smoke test does not replace an export)")
            return True
        if trainer.global_step == 0 and not trainer.ckpt_path:
            log.info(f"did not save the model to {path}: no training step ran (0 training batches or max_steps 0?)")
            return True
        return False

    def _save(self, pl_module: L.LightningModule, path: Path, what: str = "") -> None:
        if self.training_data:
            pl_module.card_info["training_data"] = self.training_data
        if self.license:
            pl_module.card_info["license"] = self.license
        pl_module.save_pretrained(path)
        log.info(f"saved the model{what} to {path} (load it with CoAlign.from_pretrained({str(path)!r}))")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._train_facts = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        self._train_facts = {
            "datamodule": None if datamodule is None else type(datamodule).__name__,
            "train_size": _dataset_size(getattr(trainer, "train_dataloader", None)),
        }

    def _record_fit(self, trainer: L.Trainer, pl_module: L.LightningModule, best: str | None, step: Any) -> None:
        """The facts of this fit, read from the trainer (the YAML's max_steps may not have been reached)."""
        strategy = getattr(trainer, "strategy", None)
        device = getattr(strategy, "root_device", None)
        devices = getattr(trainer, "num_devices", 1)
        facts = {
            "steps": int(trainer.global_step),
            "epochs": getattr(trainer, "current_epoch", None),
            **self._train_facts,
            "wall_time_s": None if self._fit_start is None else round(time.perf_counter() - self._fit_start, 1),
            "precision": None if getattr(trainer, "precision", None) is None else str(trainer.precision),
            "device": None if device is None else f"{device.type} x{devices}" if devices > 1 else device.type,
            "resumed_from": Path(trainer.ckpt_path).name if getattr(trainer, "ckpt_path", None) else None,
        }
        if best is not None:
            facts["exported"] = f"best checkpoint {Path(best).name}" + (f" (step {step})" if step is not None else "")
        pl_module.card_info["training"] = {k: v for k, v in facts.items() if v is not None}

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "model")
        if self._skip(trainer, path):
            return
        best = best_checkpoint(trainer)
        if best is None:
            self._record_fit(trainer, pl_module, None, None)
            self._save(pl_module, path)
            return
        # the best weights, then the model's own last weights back (the fit's caller still holds the model)
        last = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        self._record_fit(trainer, pl_module, best, checkpoint.get("global_step"))
        try:
            pl_module.load_state_dict(checkpoint["state_dict"])
            self._save(pl_module, path, f" of the best checkpoint {Path(best).name}")
        finally:
            pl_module.load_state_dict(last)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "model")
        if self._skip(trainer, path):
            return
        # the test's metrics and split, whether RetrievalReport runs before this callback or after it
        result: EvaluationOutcome | None = getattr(pl_module, "last_evaluation", None)
        if result is not None and result.metrics:
            metrics = {k: round(float(v), 4) for k, v in result.metrics.items()}
            pl_module.card_info.setdefault("metrics", {}).update(metrics)
            splits = pl_module.card_info.setdefault("metric_splits", {})
            splits.update({key.split("/")[0]: result.split for key in metrics if "/" in key})
            if any("/" not in key for key in metrics):
                pl_module.card_info["split"] = result.split
        self._save(pl_module, path, " (with its test metrics)")


def _dataset_size(loader: Any) -> int | None:
    """The number of examples of a training loader's dataset, when it has one with a length."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError, NotImplementedError):
        return None


class EmbeddingWriter(BasePredictionWriter):
    """Writes what ``coalign predict`` computes: the query embeddings (and target embeddings when the batches have
    targets) with their ids, and the gallery's embeddings with its image ids.

    Files in ``output_dir``: ``queries.safetensors`` (``query`` [N, D] and, when present, ``target`` [N, D]) with
    ``queries.json`` (``reference_id``, ``target_id``, ``index``: one entry per row); ``gallery.safetensors``
    (``embedding`` [M, D]) with ``gallery.json`` (``image_id``), when a gallery loader was handed over (the CLI
    does so for a DataModule with a gallery). Under DDP each rank writes ``queries.rank<R>.*`` for its share.

    Args:
        output_dir: where to write; None uses ``<trainer.default_root_dir>/predictions``.
        gallery: a loader of gallery batches (``{"image", "image_id"}``) to embed after the queries, or None.
    """

    _TENSORS = ("query", "target")
    _IDS = ("reference_id", "target_id", "index")

    def __init__(self, output_dir: str | None = None, gallery: Any = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.gallery = gallery

    def _folder(self, trainer: L.Trainer) -> Path:
        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        batches = list(predictions[0]) if predictions and isinstance(predictions[0], list) else list(predictions)
        if not batches:
            raise ValueError("predict produced no batches: the loader is empty")
        tensors = {k: torch.cat([b[k] for b in batches]).contiguous() for k in self._TENSORS if k in batches[0]}
        ids = {k: [_plain(v) for b in batches for v in b[k]] for k in self._IDS if k in batches[0]}
        folder = self._folder(trainer)
        stem = "queries" if trainer.world_size == 1 else f"queries.rank{trainer.global_rank}"
        save_file(tensors, str(folder / f"{stem}.safetensors"))
        atomic_write_json(folder / f"{stem}.json", ids, indent=None)
        log.info(f"wrote {folder / stem}.safetensors ({', '.join(f'{k} {list(v.shape)}' for k, v in tensors.items())})")
        if self.gallery is not None and trainer.is_global_zero:
            self._write_gallery(trainer, pl_module, folder)

    def _write_gallery(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        show = trainer.progress_bar_callback is not None
        gallery = encode_gallery(pl_module, self.gallery, progress=show)
        save_file({"embedding": gallery.features.embedding.contiguous()}, str(folder / "gallery.safetensors"))
        atomic_write_json(folder / "gallery.json", {"image_id": gallery.ids}, indent=None)
        log.info(f"wrote {folder / 'gallery.safetensors'} ({len(gallery)} images)")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


class CleanProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without the logger's version number (``v_num``), and counting steps against
    ``max_steps`` when a run is bounded by steps rather than epochs (no "Epoch 0/-2")."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_epochs in (None, -1) and trainer.max_steps > 0:
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch} (max_steps {trainer.max_steps})")
