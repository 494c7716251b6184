"""HMST — Hierarchical Memory-State Transformer: windowed attention, an episodic selective SSM and a
mixture-of-experts FFN, trained from scratch."""

from hiermem.models.hmst.config import PRESETS, HMSTConfig
from hiermem.models.hmst.model import HMST, HMSTState
from hiermem.models.hmst.moe import MoE, Routing
from hiermem.models.hmst.ssm import EpisodicSSM, chunked_scan

__all__ = ["HMST", "PRESETS", "EpisodicSSM", "HMSTConfig", "HMSTState", "MoE", "Routing", "chunked_scan"]
