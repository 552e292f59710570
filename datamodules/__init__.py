"""LightningDataModules (installed as ``coalign.datamodules``); every one yields the batch format of ``base``.

Each official benchmark (FashionIQ, CIRR, CIRCO) lives in one module with its evaluator and upload files.
"""

from .base import (
    CIRDataModule,
    EpochSequentialSampler,
    GalleryDataset,
    GroupedBatchSampler,
    TripletDataset,
    collate,
    load_image,
)
from .circo import CIRCODataModule, CIRCOEvaluator
from .cirhs import CIRHSDataModule
from .cirr import CIRRDataModule, CIRREvaluator
from .fashioniq import FashionIQDataModule, FashionIQEvaluator
from .shapes import ShapesDataModule
from .triplets import TripletsDataModule
from .zeroshot import ZeroShotDataModule

__all__ = [
    "CIRDataModule",
    "TripletDataset",
    "GalleryDataset",
    "GroupedBatchSampler",
    "EpochSequentialSampler",
    "collate",
    "load_image",
    "ShapesDataModule",
    "FashionIQDataModule",
    "CIRRDataModule",
    "CIRCODataModule",
    "CIRHSDataModule",
    "TripletsDataModule",
    "ZeroShotDataModule",
    "FashionIQEvaluator",
    "CIRREvaluator",
    "CIRCOEvaluator",
]
