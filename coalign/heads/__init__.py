"""Heads: global contextual alignment (retrieval similarity + loss) and local contextual reasoning."""

from .base import GlobalHead, LocalHead, max_over_embeddings

__all__ = ["GlobalHead", "LocalHead", "max_over_embeddings"]
