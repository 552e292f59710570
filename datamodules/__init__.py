"""LightningDataModules (installed as ``coalign.datamodules``); every one yields the batch format of ``base``."""

from .base import CIRDataModule, GalleryDataset, TripletDataset, collate, load_image

__all__ = ["CIRDataModule", "TripletDataset", "GalleryDataset", "collate", "load_image"]
