"""Incremental decoding with HMT memory: feed tokens, read next-token logits, forever.

The decoder's logits after any sequence of ``feed`` calls are those ``HMT.forward`` returns for
the last token of the same tokens read in one call from the same state: the unfinished segment
lives in the state (``pending``) and its memory prompt P is the one ``forward`` computes for it.
Within a segment decoding reuses the backbone's KV cache over ``[bos?, P, sensory, tokens]`` as
long as P stays the same (always with a causal summary; with the paper's summary of the segment's
own first j tokens, P changes with each of those tokens and the segment is re-read). When the
segment reaches L tokens, ``forward`` folds it into memory, the cache is dropped and a new segment
begins, so output length is unbounded and memory use stays flat.
``use_kv_cache=False`` calls ``forward`` for every feed (re-reading the segment): the reference.
"""

from __future__ import annotations

import dataclasses

import torch

from hiermem.models.base import Decoder
from hiermem.models.hmt.state import HMTMemory


class HMTDecoder(Decoder):
    """Stateful reader/writer over one HMT memory state (batch rows advance in lockstep)."""

    def __init__(self, model, state: HMTMemory | None = None, batch_size: int = 1,
                 last_logits: torch.Tensor | None = None, use_kv_cache: bool = True):
        """``state``/``last_logits``: continue after ``HMT.forward`` (pass its ``out.state`` and
        ``out.last_logits``); an unfinished segment in the state is continued."""
        super().__init__(model, state, batch_size, last_logits)  # current: always empty (see pending)
        self.use_kv_cache = use_kv_cache
        self.prompt = None  # P of the segment in progress, as the KV cache saw it
        self.past = None  # KV cache over [bos?, P, sensory, pending]

    @property
    def memory(self) -> HMTMemory:
        return self.state

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Read ids (B, l >= 1); return logits (B, V) for the token after them."""
        ids = self.check_ids(ids)
        if not self.use_kv_cache:
            self._forward(ids)
            return self.last_logits
        L = self.model.config.segment_length
        while ids.shape[1]:
            c = self.state.pending_length
            if c + ids.shape[1] >= L:
                # finish the segment in progress and any whole segments after it in one forward call
                k = (c + ids.shape[1]) // L * L - c
                self._forward(ids[:, :k])
                ids = ids[:, k:]
            else:
                self._extend(ids)
                break
        return self.last_logits

    def _forward(self, ids: torch.Tensor) -> None:
        out = self.model(ids, state=self.state, return_logits=False)
        self.state, self.last_logits = out.state, out.last_logits.float()
        self.prompt, self.past = None, None

    def _extend(self, take: torch.Tensor) -> None:
        """Add ``take`` (B, l) to the segment in progress (it stays unfinished)."""
        model, state = self.model, self.state
        c = state.pending_length
        segment = torch.cat([state.pending, take], dim=1) if c else take.clone()
        if c and self.past is not None and model.prompt_is_fixed(state, c):
            h, _, self.past = model.encode(take, self.prompt, state, past=self.past, use_cache=True, close=False)
        else:  # a new segment, a restored state or a prompt that changed: read the segment afresh
            self.prompt, _ = model.segment_prompt(segment, state)
            h, _, self.past = model.encode(segment, self.prompt, state, use_cache=True, close=False)
        self.state = dataclasses.replace(state, pending=segment, tokens=state.tokens + take.shape[1])
        self.last_logits = model.head(h[:, -1:]).squeeze(1).float()

    @property
    def holds_cache(self) -> bool:
        return self.past is not None

    def stats(self) -> dict:
        return {**super().stats(), "current_segment_tokens": self.state.pending_length}

    def reset(self) -> None:
        self.__init__(self.model, None, self.state.batch_size, use_kv_cache=self.use_kv_cache)
