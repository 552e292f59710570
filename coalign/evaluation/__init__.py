"""Evaluation: gallery encoding, ranking, benchmark metrics and submission files."""

from .engine import Gallery, encode_gallery, rank

__all__ = ["Gallery", "encode_gallery", "rank"]
