"""Zero-shot training: train on one DataModule, validate and test on another.

The paper's zero-shot setting trains CoAlign on synthetic triplets only (CIRHS) and measures it on a benchmark
whose training split it never sees. :class:`ZeroShotDataModule` joins the two halves, so one ``coalign fit``
(with ``test_after_fit``) does both::

    data:
      class_path: coalign.datamodules.ZeroShotDataModule
      init_args:
        train:
          class_path: coalign.datamodules.CIRHSDataModule
          init_args: {root: data/shapes_cirhs, group_size: 4}
        test:
          class_path: coalign.datamodules.ShapesDataModule

``configs/experiments/shapes_zeroshot.yaml`` is that recipe at CPU scale. In Python::

    data = ZeroShotDataModule(CIRHSDataModule("data/shapes_cirhs"), ShapesDataModule())
    data.connect(model.preprocess)
    trainer.fit(model, datamodule=data)
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset

from coalign.evaluation import EvaluationTask, RetrievalEvaluator

from .base import CIRDataModule, Transform

__all__ = ["ZeroShotDataModule"]


class ZeroShotDataModule(CIRDataModule):
    """Training batches from ``train``; validation, test, gallery and evaluation protocol from ``test``.

    ``connect`` hands the model's transform to both. ``setup("fit")`` sets ``train`` up for fitting and ``test``
    for validation only (the test module's own training split, if it has one, is never read); the other stages
    go to ``test`` alone.

    Args:
        train: the DataModule whose ``train_dataloader`` trains the model (e.g. ``CIRHSDataModule``).
        test: the DataModule that validates and tests it (e.g. ``ShapesDataModule`` or a benchmark).
        num_workers: loader worker processes for both; None keeps each module's own setting.
    """

    def __init__(self, train: CIRDataModule, test: CIRDataModule, num_workers: int | None = None):
        for name, module in (("train", train), ("test", test)):
            if not isinstance(module, CIRDataModule):
                raise TypeError(f"ZeroShotDataModule's {name} must be a CIRDataModule, got {type(module).__name__}")
        if num_workers is not None:
            if num_workers < 0:
                raise ValueError(f"num_workers must be >= 0, got {num_workers}")
            train.num_workers = test.num_workers = num_workers
        super().__init__(batch_size=train.batch_size, num_workers=train.num_workers)
        self.train_data = train
        self.test_data = test

    @property
    def has_gallery(self) -> bool:  # type: ignore[override]
        return self.test_data.has_gallery

    # -- the model's transform ---------------------------------------------------------------------------
    def connect(self, image_transform: Transform) -> None:
        """Hand the model's transform to both modules (a transform given to either constructor wins there)."""
        super().connect(image_transform)
        self.train_data.connect(image_transform)
        self.test_data.connect(image_transform)

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.train_data.prepare_data()
        self.test_data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.train_data.setup("fit")
        self.test_data.setup("validate" if stage == "fit" else stage)

    def train_dataloader(self) -> DataLoader:
        return self.train_data.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.test_data.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.test_data.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.test_data.predict_dataloader()

    # -- evaluation: all from the test module --------------------------------------------------------------
    def evaluation_task(self, stage: str) -> EvaluationTask | None:
        return self.test_data.evaluation_task(stage)

    def evaluation_split(self, stage: str) -> str:
        return self.test_data.evaluation_split(stage)

    def gallery_dataloader(self, split: str) -> DataLoader:
        return self.test_data.gallery_dataloader(split)

    def gallery_dataset(self, split: str) -> Dataset:
        return self.test_data.gallery_dataset(split)

    def build_evaluator(self, split: str) -> RetrievalEvaluator:
        return self.test_data.build_evaluator(split)

    def ranking_files(self, split: str, evaluator: RetrievalEvaluator) -> dict[str, dict]:
        return self.test_data.ranking_files(split, evaluator)
