"""HMT — Hierarchical Memory Transformer (arXiv 2405.06067)."""

from hiermem.models.hmt.config import HMTConfig
from hiermem.models.hmt.decoder import HMTDecoder
from hiermem.models.hmt.model import HMT, HMTOutput
from hiermem.models.hmt.state import HMTMemory

__all__ = ["HMT", "HMTConfig", "HMTDecoder", "HMTMemory", "HMTOutput"]
