"""Reusable memory parts: banks with eviction policies, cross-attention recall, projections."""

from hiermem.memory.bank import AttentionEviction, FIFOEviction, MemoryBank, make_eviction
from hiermem.memory.recall import CrossAttentionRecall, make_projection

__all__ = ["AttentionEviction", "CrossAttentionRecall", "FIFOEviction", "MemoryBank", "make_eviction",
           "make_projection"]
