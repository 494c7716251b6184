"""Hierarchos — Titans-style long-term memory with an HRM manager/worker of RWKV-style cells."""

from hiermem.models.hierarchos.config import HierarchosConfig
from hiermem.models.hierarchos.model import Hierarchos, HierarchosOutput, HierarchosState

__all__ = ["Hierarchos", "HierarchosConfig", "HierarchosOutput", "HierarchosState"]
