"""LightningDataModules (installed as ``coalign.datamodules``); every one yields the batch format of ``base``."""

from .base import (
    CIRDataModule,
    EpochSequentialSampler,
    GalleryDataset,
    GroupedBatchSampler,
    TripletDataset,
    collate,
    load_image,
)
from .circo import CIRCODataModule
from .cirhs import CIRHSDataModule
from .cirr import CIRRDataModule
from .fashioniq import FashionIQDataModule
from .shapes import ShapesDataModule
from .triplets import TripletsDataModule

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
]
