"""Reusable memory parts: banks with eviction policies, cross-attention recall, projections, and the
semantic store (FAISS + SQLite on disk; faiss is imported when a store is made)."""

from hiermem.memory.bank import AttentionEviction, FIFOEviction, MemoryBank, make_eviction
from hiermem.memory.recall import CrossAttentionRecall, make_projection
from hiermem.memory.semantic import Hit, SemanticStore

__all__ = ["AttentionEviction", "CrossAttentionRecall", "FIFOEviction", "Hit", "MemoryBank", "SemanticStore",
           "make_eviction", "make_projection"]
