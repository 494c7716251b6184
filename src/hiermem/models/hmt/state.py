"""HMTMemory: the whole memory state of an HMT reader, passed in and returned explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hiermem.errors import CheckpointError
from hiermem.io import load_tensors, save_tensors
from hiermem.memory.bank import MemoryBank


@dataclass
class HMTMemory:
    """Long-term bank, last memory embedding, sensory tokens and counters.

    bank: cached memory embeddings (B, n <= N, d) with their source segment and usage.
    last: m_{n-1} (B, 1, d), the previous segment's memory embedding (stage 1 uses it as P_n).
    sensory: (B, <= k) last tokens of the previous segment.
    segments, tokens: how much this state has read.
    """

    bank: MemoryBank
    last: torch.Tensor | None
    sensory: torch.Tensor
    segments: int = 0
    tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.sensory.shape[0]

    def detach(self) -> "HMTMemory":
        """Cut the gradient chain (truncated BPTT boundary)."""
        return HMTMemory(self.bank.detach(), None if self.last is None else self.last.detach(),
                         self.sensory, self.segments, self.tokens)

    def to(self, device=None, dtype=None) -> "HMTMemory":
        return HMTMemory(self.bank.to(device, dtype),
                         None if self.last is None else self.last.to(device=device, dtype=dtype),
                         self.sensory.to(device), self.segments, self.tokens)

    def stats(self) -> dict:
        return {"slots_used": self.bank.size, "segments": self.segments, "tokens": self.tokens,
                "batch_size": self.batch_size}

    # --- serialisation -------------------------------------------------------------------
    def save(self, path: str | Path, fingerprint: dict | None = None) -> None:
        """Save to a safetensors file (atomic). ``fingerprint`` identifies the model it belongs to."""
        tensors = {"bank.embeddings": self.bank.embeddings, "bank.sources": self.bank.sources,
                   "bank.usage": self.bank.usage, "sensory": self.sensory}
        if self.last is not None:
            tensors["last"] = self.last
        save_tensors(path, tensors, {"kind": "hmt-memory", "segments": self.segments,
                                     "tokens": self.tokens, "fingerprint": fingerprint or {}})

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=None, fingerprint: dict | None = None) -> "HMTMemory":
        """Load a state saved by :meth:`save`; refuse one made by a different model."""
        tensors, meta = load_tensors(path, device)
        if meta.get("kind") != "hmt-memory":
            raise CheckpointError(f"{path} is not an HMT memory-state file")
        saved = meta.get("fingerprint") or {}
        if fingerprint and saved and saved != fingerprint:
            raise CheckpointError(f"memory state {path} was made by a different model ({saved}); "
                                  f"this model is {fingerprint}. Start a fresh state instead.")
        try:
            bank = MemoryBank(tensors["bank.embeddings"].to(dtype=dtype), tensors["bank.sources"],
                              tensors["bank.usage"])
            last = tensors.get("last")
            return cls(bank=bank, last=None if last is None else last.to(dtype=dtype),
                       sensory=tensors["sensory"], segments=int(meta["segments"]), tokens=int(meta["tokens"]))
        except KeyError as exc:
            raise CheckpointError(f"memory state {path} lacks {exc}; the file is incomplete") from exc
