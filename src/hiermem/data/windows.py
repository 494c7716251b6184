"""Fixed-length training windows cut from a tokenised corpus, shuffled per epoch, resumable.

Windows of ``window_tokens`` tokens start every ``window_tokens`` tokens inside each document
(no overlap, so no token is trained on twice per epoch). The tail of a document shorter than
a window is dropped, unless it has at least ``min_window_tokens`` tokens: then the document also
yields its last ``window_tokens`` tokens (a window that overlaps the previous one), which keeps
every batch rectangular with no padding. Documents shorter than one window yield nothing. With
``straddle=True`` the corpus is one stream and windows may cross document boundaries.

Each epoch shuffles all windows with a permutation seeded by ``(seed, epoch)``, the same on
every rank; rank ``r`` of ``world_size`` takes the ``r``-th of ``world_size`` equal, disjoint
slices of it (the remainder is left out of that epoch) and groups it into batches, dropping an
incomplete last batch. The position is ``(epoch, step)``, so ``state_dict`` /
``load_state_dict`` resume at exactly the next batch.
"""

from __future__ import annotations

import numpy as np
import torch

from hiermem.data.tokenized import TokenizedCorpus
from hiermem.errors import ConfigError, DataError

_STATE_CHECKED = ("window_tokens", "batch_size", "seed", "shuffle", "straddle", "world_size",
                  "min_window_tokens", "num_windows", "num_tokens")


def window_starts(corpus: TokenizedCorpus, window_tokens: int, straddle: bool = False,
                  min_window_tokens: int | None = None) -> np.ndarray:
    """(n_windows,) int64 start offsets into ``corpus.tokens`` (see the module docstring)."""
    w = window_tokens
    keep_tail = w if min_window_tokens is None else min_window_tokens
    if straddle:
        n = corpus.num_tokens
        starts = np.arange(0, n - w + 1, w, dtype=np.int64)
        if n >= w and 0 < n % w and n % w >= keep_tail:
            starts = np.append(starts, n - w)
        return starts
    lengths = corpus.lengths  # (D,)
    full = lengths // w  # (D,) whole windows per document
    doc = np.repeat(np.arange(len(lengths)), full)  # (W,) document of each window
    first = np.repeat(np.cumsum(full) - full, full)  # (W,) index of its document's first window
    starts = corpus.offsets[doc] + (np.arange(len(doc)) - first) * w
    tail = lengths % w
    extra = np.nonzero((full > 0) & (tail > 0) & (tail >= keep_tail))[0]
    if len(extra):
        starts = np.sort(np.concatenate([starts, corpus.offsets[extra + 1] - w]))
    return starts.astype(np.int64)


class WindowLoader:
    """Endless iterator of ``(batch_size, window_tokens)`` LongTensor batches over a corpus.

    ``len(loader)`` is the number of batches per epoch on this rank; ``loader.epoch`` and
    ``loader.step`` give the position of the next batch.
    """

    def __init__(self, corpus: TokenizedCorpus, window_tokens: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, straddle: bool = False, rank: int = 0, world_size: int = 1,
                 min_window_tokens: int | None = None):
        if window_tokens < 1 or batch_size < 1:
            raise ConfigError(f"window_tokens ({window_tokens}) and batch_size ({batch_size}) must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if min_window_tokens is not None and not 1 <= min_window_tokens <= window_tokens:
            raise ConfigError(f"min_window_tokens ({min_window_tokens}) must be between 1 and window_tokens "
                              f"({window_tokens})")
        self.corpus = corpus
        self.window_tokens, self.batch_size, self.seed = window_tokens, batch_size, seed
        self.shuffle, self.straddle, self.min_window_tokens = shuffle, straddle, min_window_tokens
        self.rank, self.world_size = rank, world_size
        self.starts = window_starts(corpus, window_tokens, straddle, min_window_tokens)  # (N,)
        self.per_rank = len(self.starts) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            longest = int(corpus.lengths.max()) if len(corpus) else 0
            need = batch_size * world_size
            raise DataError(
                f"{corpus.source} yields {len(self.starts)} windows of {window_tokens} tokens, fewer than one batch "
                f"({batch_size} per rank x {world_size} ranks = {need}); its longest document has {longest} tokens "
                f"({corpus.num_tokens} in all). Use a shorter window, a smaller batch, more data, or straddle=True")
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch * batch_size,) window start offsets of this rank, in batch order."""
        if epoch != self._order_epoch:
            n = len(self.starts)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            mine = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            self._order = self.starts[mine[:self.batches_per_epoch * self.batch_size]]
            self._order_epoch = epoch
        return self._order

    def batch(self, epoch: int, step: int) -> torch.Tensor:
        """Batch ``step`` of ``epoch`` on this rank: (batch_size, window_tokens) int64, without moving."""
        if not 0 <= step < self.batches_per_epoch or epoch < 0:
            raise IndexError(f"no batch {step} of epoch {epoch} (an epoch has {self.batches_per_epoch} batches)")
        starts = self._epoch_order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]  # (B,)
        index = starts[:, None] + np.arange(self.window_tokens)  # (B, W)
        return torch.from_numpy(np.asarray(self.corpus.tokens[index], dtype=np.int64))

    def __iter__(self) -> WindowLoader:
        return self

    def __next__(self) -> torch.Tensor:
        out = self.batch(self.epoch, self.step)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        """JSON-able position and configuration; the batch after it is the next one yielded."""
        return {"epoch": self.epoch, "step": self.step, "rank": self.rank, "window_tokens": self.window_tokens,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "straddle": self.straddle, "world_size": self.world_size,
                "min_window_tokens": self.min_window_tokens, "num_windows": self.num_windows,
                "num_tokens": self.corpus.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (any rank's: ranks move in lockstep); the data and settings must match."""
        now = self.state_dict()
        diff = [f"{k}: saved {state[k]!r}, now {now[k]!r}" for k in _STATE_CHECKED if k in state and state[k] != now[k]]
        if diff:
            raise ConfigError("cannot resume the data position: the loader differs from the saved one ("
                              + "; ".join(diff) + "); resume with the same data, window, batch, seed and world size")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.batches_per_epoch:
            raise ConfigError(f"saved data position epoch {epoch}, step {step} is out of range "
                              f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.step = epoch, step
