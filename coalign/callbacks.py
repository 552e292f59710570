"""Lightning callbacks: the retrieval report (metrics table, ``metrics.json``, a picture of results)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from .evaluation.engine import EvaluationOutcome
from .io import atomic_write_json, format_table
from .viz import denormalize, retrieval_grid

__all__ = ["RetrievalReport", "ExportPretrained"]


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
            print(f"wrote {out / name}")
        metrics = {k: round(float(v), 4) for k, v in result.metrics.items()}
        if not metrics:  # a split without labels (CIRR test1, CIRCO test): upload files only
            return
        print("\n" + format_table(metrics, f"{prefix} retrieval ({result.split} split), in %"))
        atomic_write_json(out / "metrics.json", {**metrics, "split": result.split, "stage": prefix}, indent=2)
        pl_module.card_info.setdefault("metrics", {}).update(metrics)
        if result.examples and hasattr(result.gallery_images, "entries"):
            self._picture(result, pl_module, out / "retrieval_examples.png")

    def _picture(self, result: EvaluationOutcome, pl_module, path: Path) -> None:
        gallery = result.gallery_images  # a GalleryDataset: knows its ids without loading every image
        position = {str(image_id): i for i, (image_id, _) in enumerate(gallery.entries)}
        mean, std = pl_module.preprocess.mean, pl_module.preprocess.std
        rows = []
        for ex in result.examples[: self.num_examples]:
            ids = ex["ranked_ids"][: self.top_k]
            results = [denormalize(gallery[position[i]]["image"], mean, std) for i in ids if i in position]
            rows.append(
                {
                    "reference": denormalize(ex["reference"], mean, std),
                    "text": ex["text"],
                    "results": results,
                    "correct": ids.index(ex["target_id"]) if ex["target_id"] in ids else None,
                }
            )
        retrieval_grid(rows, path)
        print(f"wrote {path} (true targets framed in green)")


class ExportPretrained(L.Callback):
    """At the end of ``fit`` (and again after a test run, with its metrics in the model card), write the model
    with ``save_pretrained`` to ``dirpath`` (default ``<default_root_dir>/model``), ready for
    ``CoAlign.from_pretrained``, ``coalign evaluate --model`` and ``coalign index --model``.

    Nothing is written when no training step ran (0 training batches, ``max_steps: 0``) and the model was not
    loaded from a checkpoint: an untrained model must not pass for a trained one. Under ``fast_dev_run`` an
    existing folder that this run did not write is kept (a smoke test never replaces a real export).

    Args:
        dirpath: output folder; None uses ``<trainer.default_root_dir>/model``.
        training_data: a description of the training data for the model card.
    """

    def __init__(self, dirpath: str | None = None, training_data: str | None = None):
        self.dirpath = dirpath
        self.training_data = training_data
        self._written: set[Path] = set()

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "model")
        if trainer.global_step == 0 and not trainer.ckpt_path:
            print(f"did not save the model to {path}: no training step ran (0 training batches or max_steps 0?)")
            return
        if trainer.fast_dev_run and path.exists() and path not in self._written:
            print(f"fast_dev_run: kept the existing {path} (a smoke test does not replace an export)")
            return
        if self.training_data:
            pl_module.card_info["training_data"] = self.training_data
        pl_module.save_pretrained(path)
        self._written.add(path)
        print(f"saved the model to {path} (load it with CoAlign.from_pretrained({str(path)!r}))")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)
