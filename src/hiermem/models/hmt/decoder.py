"""Incremental decoding with HMT memory: feed tokens, read next-token logits, forever.

Within the current segment decoding reuses the backbone's KV cache over ``[P*, sensory, tokens]``.
When the segment reaches L tokens it is folded into memory exactly as ``HMT.forward`` would (same
summary, recall, encoding and memory update), the cache is dropped and a new segment begins, so
output length is unbounded and memory use stays flat.

P* for a segment in progress is recalled with the summary of the segment's tokens known when
decoding inside it began (the full segment is not known yet); it stays fixed until the fold.
``use_kv_cache=False`` recomputes the whole segment at every step: the slow reference.
"""

from __future__ import annotations

import torch

from hiermem.models.base import Decoder
from hiermem.models.hmt.state import HMTMemory


class HMTDecoder(Decoder):
    """Stateful reader/writer over one HMT memory state (batch rows advance in lockstep)."""

    def __init__(self, model, state: HMTMemory | None = None, batch_size: int = 1,
                 last_logits: torch.Tensor | None = None, use_kv_cache: bool = True):
        """``state``/``last_logits``: continue after ``HMT.forward`` on an input that ended on a
        segment boundary (pass its ``out.state`` and ``out.last_logits``)."""
        super().__init__(model, state, batch_size, last_logits)  # current: (B, c < L) segment in progress
        self.use_kv_cache = use_kv_cache
        self.prompt = None  # P* of the current segment
        self.past = None

    @property
    def memory(self) -> HMTMemory:
        return self.state

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Read ids (B, l >= 1); return logits (B, V) for the token after them."""
        ids = self.check_ids(ids)
        L = self.model.config.segment_length
        while ids.shape[1]:
            if self.current.shape[1] == 0 and ids.shape[1] >= L:
                # whole segments: one forward pass folds them (token-wise reading would encode each twice)
                k = ids.shape[1] // L * L
                out = self.model(ids[:, :k], state=self.state, return_logits=False)
                self.state, self.last_logits = out.state, out.last_logits.float()
                ids = ids[:, k:]
                continue
            take, ids = ids[:, :L - self.current.shape[1]], ids[:, L - self.current.shape[1]:]
            self._extend(take)
            if self.current.shape[1] == L:
                self._fold()
        return self.last_logits

    def _start_segment(self, first: torch.Tensor) -> None:
        model = self.model
        if not model.config.use_memory:
            self.prompt = None
            return
        summary = model.summarize(first) if model.needs_summary(self.state) else None
        self.prompt, _ = model.memory_prompt(summary, self.state)

    def _extend(self, take: torch.Tensor) -> None:
        if self.current.shape[1] == 0:
            self._start_segment(take)
            self.past = None
        self.current = torch.cat([self.current, take], dim=1)
        if self.use_kv_cache:
            h, _, self.past = self.model.encode(take, self.prompt, self.state, past=self.past,
                                                use_cache=True, close=False)
        else:
            h, _, _ = self.model.encode(self.current, self.prompt, self.state, close=False)
        self.last_logits = self.model.head(h[:, -1:]).squeeze(1).float()

    def _fold(self) -> None:
        """The segment is full: update memory exactly as forward() does."""
        model, ids = self.model, self.current
        summary = model.summarize(ids) if model.needs_summary(self.state) else None
        prompt, weights = model.memory_prompt(summary, self.state) if model.config.use_memory else (None, None)
        h, new_mem, _ = model.encode(ids, prompt, self.state)
        self.state = model.update_memory(self.state, ids, new_mem, weights)
        self.last_logits = model.head(h[:, -1:]).squeeze(1).float()
        self.current = self.current[:, :0]
        self.prompt, self.past = None, None

    def reset(self) -> None:
        self.__init__(self.model, None, self.state.batch_size, use_kv_cache=self.use_kv_cache)
