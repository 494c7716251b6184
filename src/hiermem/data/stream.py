"""Contiguous streams for training with carried state (truncated BPTT over whole documents).

``StreamLoader`` gives each of the ``batch_size`` rows its own stream of documents, read in order
from the first token to the last in consecutive windows of ``window_tokens`` tokens: a model that
carries its state (detached) from one batch to the next sees each document as one long input,
the regime it is evaluated in. ``StreamBatch.reset`` (B,) marks the rows whose window begins a new
document, where the trainer starts that row from a fresh state.

Documents are dealt to rows in a per-epoch order seeded by ``(seed, epoch)``; rank ``r`` of
``world_size`` takes every ``world_size``-th document of that order. A document's tail shorter
than a window is dropped (it would need padding inside a carried state); documents shorter than
one window yield nothing. The position (epoch, next document, and each row's document and
offset) is the whole loader state, so ``state_dict`` / ``load_state_dict`` resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hiermem.data.tokenized import TokenizedCorpus
from hiermem.errors import ConfigError, DataError


@dataclass
class StreamBatch:
    """ids (B, T) int64 and reset (B,) bool: row starts a new document with this window."""

    ids: torch.Tensor
    reset: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "StreamBatch":
        return StreamBatch(self.ids.to(device, non_blocking=non_blocking), self.reset.to(device))


class StreamLoader:
    """Endless iterator of :class:`StreamBatch` (see the module docstring)."""

    def __init__(self, corpus: TokenizedCorpus, window_tokens: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if window_tokens < 1 or batch_size < 1:
            raise ConfigError(f"window_tokens ({window_tokens}) and batch_size ({batch_size}) must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.corpus, self.window_tokens, self.batch_size = corpus, window_tokens, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.usable = np.nonzero(corpus.lengths >= window_tokens)[0]  # documents with >= 1 window
        if len(self.usable) < batch_size * world_size:
            raise DataError(f"{corpus.source} has {len(self.usable)} documents of at least {window_tokens} tokens; "
                            f"carried-state streams need one per row ({batch_size} per rank x {world_size} ranks). "
                            "Use shorter windows, a smaller batch or more documents")
        self.epoch, self.next_doc = 0, 0
        self.rows = [(-1, 0)] * batch_size  # per row: (document index, next offset in it)

    def _order(self, epoch: int) -> np.ndarray:
        docs = self.usable
        if self.shuffle:
            docs = docs[np.random.default_rng([self.seed, epoch]).permutation(len(docs))]
        return docs[self.rank::self.world_size]

    def _take_document(self) -> int:
        order = self._order(self.epoch)
        if self.next_doc >= len(order):
            self.epoch, self.next_doc = self.epoch + 1, 0
            order = self._order(self.epoch)
        doc = int(order[self.next_doc])
        self.next_doc += 1
        return doc

    def __iter__(self) -> "StreamLoader":
        return self

    def __next__(self) -> StreamBatch:
        w, rows, resets = self.window_tokens, [], []
        for r, (doc, offset) in enumerate(self.rows):
            fresh = doc < 0 or offset + w > int(self.corpus.lengths[doc])
            if fresh:
                doc, offset = self._take_document(), 0
            rows.append(np.asarray(self.corpus.document(doc)[offset:offset + w], dtype=np.int64))
            resets.append(fresh)
            self.rows[r] = (doc, offset + w)
        return StreamBatch(torch.from_numpy(np.stack(rows)), torch.tensor(resets))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_doc": self.next_doc, "rows": [list(r) for r in self.rows],
                "window_tokens": self.window_tokens, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "world_size": self.world_size, "num_tokens": self.corpus.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        keys = ("window_tokens", "batch_size", "seed", "shuffle", "world_size", "num_tokens")
        diff = [f"{k}: saved {state.get(k)!r}, now {now[k]!r}" for k in keys if state.get(k) != now[k]]
        if diff:
            raise ConfigError("cannot resume the stream position: the loader differs from the saved one ("
                              + "; ".join(diff) + ")")
        self.epoch, self.next_doc = int(state["epoch"]), int(state["next_doc"])
        self.rows = [(int(d), int(o)) for d, o in state["rows"]]
