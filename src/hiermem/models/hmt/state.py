"""HMTMemory: the whole memory state of an HMT reader, passed in and returned explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiermem.memory.bank import MemoryBank
from hiermem.models.state import ModelState, batch_field


@dataclass
class HMTMemory(ModelState):
    """Long-term bank, last memory embedding, sensory tokens and counters.

    bank: cached memory embeddings (B, n <= N, d) with their source segment and usage.
    last: m_{n-1} (B, 1, d), the previous segment's memory embedding (stage 1 uses it as P_n).
    sensory: (B, <= k) last tokens of the previous segment.
    segments, tokens: how much this state has read.

    Rows of a bank share one slot count, so ``reset_rows`` works only when every row (or none)
    starts afresh; the other utilities (rows, detach, save/load, fingerprint) come from
    :class:`~hiermem.models.state.ModelState`.
    """

    KIND: ClassVar[str] = "hmt-memory"
    bank: MemoryBank
    last: torch.Tensor | None = batch_field(0)
    sensory: torch.Tensor = batch_field(0)
    segments: int = 0
    tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.sensory.shape[0]

    def stats(self) -> dict:
        return {"slots_used": self.bank.size, "segments": self.segments, "tokens": self.tokens,
                "batch_size": self.batch_size}
