"""HMST — Hierarchical Memory-State Transformer: windowed attention, an episodic selective SSM and a
mixture-of-experts FFN, trained from scratch."""

from hiermem.models.hmst.config import PRESETS, HMSTConfig
from hiermem.models.hmst.controller import GATES, ControllerConfig, GateDecision, MetaController, step_features
from hiermem.models.hmst.critic import Critic, CriticConfig, expected_calibration_error, fit_critic
from hiermem.models.hmst.model import HMST, HMSTState
from hiermem.models.hmst.moe import MoE, Routing
from hiermem.models.hmst.ssm import EpisodicSSM, chunked_scan

__all__ = ["GATES", "HMST", "PRESETS", "ControllerConfig", "Critic", "CriticConfig", "EpisodicSSM", "GateDecision",
           "HMSTConfig", "HMSTState", "MetaController", "MoE", "Routing", "chunked_scan", "expected_calibration_error",
           "fit_critic", "step_features"]
