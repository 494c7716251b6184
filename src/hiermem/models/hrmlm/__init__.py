"""HRMLM — the hierarchical recurrent memory language model (two GRU levels, N x T cycles per token)."""

from hiermem.models.hrmlm.config import HRMLMConfig
from hiermem.models.hrmlm.model import HRMLM, HRMLMOutput, HRMLMState

__all__ = ["HRMLM", "HRMLMConfig", "HRMLMOutput", "HRMLMState"]
