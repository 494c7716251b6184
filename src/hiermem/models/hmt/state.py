"""HMTMemory: the whole memory state of an HMT reader, passed in and returned explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiermem.memory.bank import MemoryBank
from hiermem.models.state import ModelState, batch_field


@dataclass
class HMTMemory(ModelState):
    """Long-term bank, last memory embedding, sensory tokens, the unfinished segment and counters.

    bank: cached memory embeddings (B, n <= N, d) with their source segment and usage.
    last: m_{n-1} (B, 1, d), the previous segment's memory embedding (stage 1 uses it as P_n).
    sensory: (B, <= k) last tokens of the previous segment.
    pending: (B, c < L) tokens of the segment in progress (read, not yet folded into memory), or
        None; the next call continues that segment, so calls compose whatever their lengths.
    tail: (B, <= j) last tokens of the previous segment, the next summary's input when the
        config's ``summary_source`` is "previous" (None otherwise).
    segments: segments folded into memory; tokens: every token read (pending ones included);
    evictions: slots evicted from the bank so far.

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
    evictions: int = 0
    pending: torch.Tensor | None = batch_field(0, default=None)
    tail: torch.Tensor | None = batch_field(0, default=None)

    @property
    def pending_length(self) -> int:
        return 0 if self.pending is None else self.pending.shape[1]

    @property
    def batch_size(self) -> int:
        return self.sensory.shape[0]

    def stats(self) -> dict:
        return {"slots_used": self.bank.size, "segments": self.segments, "tokens": self.tokens,
                "pending_tokens": self.pending_length, "evictions": self.evictions, "batch_size": self.batch_size}
