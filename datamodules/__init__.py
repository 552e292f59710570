"""LightningDataModules (installed as ``coalign.datamodules``); every one yields the batch format of ``base``."""

from .base import CIRDataModule, GalleryDataset, GroupedBatchSampler, TripletDataset, collate, load_image

__all__ = ["CIRDataModule", "TripletDataset", "GalleryDataset", "GroupedBatchSampler", "collate", "load_image"]

# benchmark DataModules (FashionIQ, CIRR, CIRCO): official layouts and evaluation protocols
from .circo import CIRCODataModule  # noqa: E402
from .cirr import CIRRDataModule  # noqa: E402
from .fashioniq import FashionIQDataModule  # noqa: E402

__all__ += ["FashionIQDataModule", "CIRRDataModule", "CIRCODataModule"]

from .cirhs import CIRHSDataModule  # noqa: E402

__all__ += ["CIRHSDataModule"]
