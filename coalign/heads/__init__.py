"""Heads: global contextual alignment (retrieval similarity + loss) and local contextual reasoning."""

from .base import GlobalHead, LocalHead, max_over_embeddings, soft_positive_targets
from .global_alignment import ContextualAlignmentHead
from .local_reasoning import TokenReasoningHead

__all__ = [
    "GlobalHead",
    "LocalHead",
    "max_over_embeddings",
    "soft_positive_targets",
    "ContextualAlignmentHead",
    "TokenReasoningHead",
]
