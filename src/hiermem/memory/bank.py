"""A bounded bank of memory embeddings with pluggable eviction.

The bank is plain data (tensors), so it can travel in a memory state, be saved and restored.
Eviction policies are small objects that decide which slot leaves when the bank is full:

- ``FIFOEviction``: the oldest slot leaves (the HMT paper's cache).
- ``AttentionEviction``: each slot keeps an exponential moving average of the recall weight it
  received; the slot retrieval has attended to least leaves. A new slot starts at the uniform share
  ``1/n`` so that it is neither favoured nor doomed before it has been seen by retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hiermem.errors import ConfigError
from hiermem.models.state import ModelState


@dataclass
class MemoryBank(ModelState):
    """``embeddings`` (B, n, d), ``sources`` (B, n) segment index each slot came from,
    ``usage`` (B, n) eviction score (recall-weight EMA; unused by FIFO, kept in float32)."""

    KIND: ClassVar[str] = "memory-bank"
    embeddings: torch.Tensor
    sources: torch.Tensor
    usage: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, dim: int, device=None, dtype=None) -> "MemoryBank":
        return cls(embeddings=torch.zeros(batch_size, 0, dim, device=device, dtype=dtype),
                   sources=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
                   usage=torch.zeros(batch_size, 0, dtype=torch.float32, device=device))

    @property
    def size(self) -> int:
        return self.embeddings.shape[1]

    def detach(self) -> "MemoryBank":
        return MemoryBank(self.embeddings.detach(), self.sources, self.usage)

    def to(self, device=None, dtype=None) -> "MemoryBank":
        return MemoryBank(self.embeddings.to(device=device, dtype=dtype), self.sources.to(device),
                          self.usage.to(device))


class FIFOEviction:
    """Evict the oldest slot."""

    name = "fifo"

    def observe(self, bank: MemoryBank, weights: torch.Tensor) -> MemoryBank:
        return bank

    def victims(self, bank: MemoryBank) -> torch.Tensor:
        """(B,) index of the slot to evict in each row."""
        return torch.zeros(bank.embeddings.shape[0], dtype=torch.long, device=bank.embeddings.device)


class AttentionEviction:
    """Evict the slot with the lowest exponentially decayed recall weight."""

    name = "attention"

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"eviction_decay must be in [0, 1), got {decay}")
        self.decay = decay

    def observe(self, bank: MemoryBank, weights: torch.Tensor) -> MemoryBank:
        """Fold one retrieval's weights (B, n) into the usage scores."""
        usage = self.decay * bank.usage + (1.0 - self.decay) * weights.detach().float()
        return MemoryBank(bank.embeddings, bank.sources, usage)

    def victims(self, bank: MemoryBank) -> torch.Tensor:
        # ties (e.g. never attended) go to the oldest slot: argmin returns the first minimum
        return bank.usage.argmin(dim=1)


def make_eviction(name: str, decay: float = 0.9):
    if name == "fifo":
        return FIFOEviction()
    if name == "attention":
        return AttentionEviction(decay)
    raise ConfigError(f"unknown eviction policy {name!r}; choose 'fifo' or 'attention'")


def drop_slots(bank: MemoryBank, victims: torch.Tensor) -> MemoryBank:
    """Remove one slot per row (victims: (B,)), keeping the order of the others."""
    b, n, d = bank.embeddings.shape
    keep = torch.ones(b, n, dtype=torch.bool, device=victims.device)
    keep[torch.arange(b, device=victims.device), victims] = False
    return MemoryBank(bank.embeddings[keep].view(b, n - 1, d), bank.sources[keep].view(b, n - 1),
                      bank.usage[keep].view(b, n - 1))


def append(bank: MemoryBank, memory: torch.Tensor, source: int, capacity: int, policy) -> tuple[MemoryBank, torch.Tensor | None]:
    """Add ``memory`` (B, 1, d) as a new slot; evict one first if the bank is full.

    Returns the new bank and the evicted slots' source segment indices (B,) or None.
    """
    evicted = None
    if bank.size >= capacity:
        victims = policy.victims(bank)
        evicted = bank.sources.gather(1, victims[:, None]).squeeze(1)
        bank = drop_slots(bank, victims)
    b = memory.shape[0]
    src = torch.full((b, 1), source, dtype=torch.long, device=bank.sources.device)
    if bank.size:  # a new slot starts at the mean usage of the others: neither favoured nor doomed
        fresh = bank.usage.mean(dim=1, keepdim=True)
    else:
        fresh = torch.ones(b, 1, dtype=torch.float32, device=bank.usage.device)
    return MemoryBank(torch.cat([bank.embeddings, memory.to(bank.embeddings.dtype)], dim=1),
                      torch.cat([bank.sources, src], dim=1),
                      torch.cat([bank.usage, fresh], dim=1)), evicted
