"""HMST's semantic-retrieval keys: attention pooling of final hidden states into unit vectors.

A stored chunk's key and a question's query are each ``normalise(sum_t softmax(s . h_t) W h_t)``
over their tokens' final hidden states h_t (d), with separate score vectors s and projections W
for keys and queries. Both start as the same map with zero scores (mean pooling through one random
projection), so an untrained retriever already matches chunks and questions by their mean hidden
state; :func:`fit_retriever` trains them contrastively (InfoNCE over a document's chunks) on
questions whose answering chunk is known (the synthetic facts task).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import ConfigError
from hiermem.io import check_ints


@dataclass
class RetrieverConfig:
    """hidden_size: the decoder's d; dim: key size (the semantic store's dim); temperature: InfoNCE's."""

    hidden_size: int
    dim: int = 64
    temperature: float = 0.05

    def __post_init__(self):
        check_ints(self, ("hidden_size", "dim"), what="retriever ")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"retriever temperature must be > 0, got {self.temperature!r}")


class Retriever(nn.Module):
    """Hidden states (B, n, d) with a mask (B, n) -> unit keys or queries (B, dim)."""

    def __init__(self, config: RetrieverConfig):
        super().__init__()
        self.config = c = config
        gen = torch.Generator().manual_seed(0)
        proj = torch.randn(c.dim, c.hidden_size, generator=gen) / c.hidden_size ** 0.5
        self.key_proj, self.query_proj = nn.Parameter(proj.clone()), nn.Parameter(proj.clone())
        self.key_score, self.query_score = (nn.Parameter(torch.zeros(c.hidden_size)) for _ in range(2))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, query: bool = False) -> torch.Tensor:
        """hidden (B, n, d), mask (B, n) bool (None: all real) -> (B, dim) unit vectors."""
        proj, score = (self.query_proj, self.query_score) if query else (self.key_proj, self.key_score)
        h = hidden.to(proj.dtype)
        s = h @ score  # (B, n)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = s.softmax(-1)  # (B, n)
        return F.normalize((w.unsqueeze(-1) * h).sum(1) @ proj.T, dim=-1)

    @torch.no_grad()
    def _pool_one(self, hidden, query: bool) -> np.ndarray:
        """One sequence's hidden states (n, d) (numpy or tensor) -> (1, dim) float32."""
        h = torch.as_tensor(np.asarray(hidden), dtype=self.key_proj.dtype)[None]
        return self.pool(h, query=query).float().numpy()

    def key_numpy(self, hidden) -> np.ndarray:
        """One chunk's hidden states (n, d) -> its key (dim,) float32 (a
        :class:`~hiermem.models.hmst.consolidation.Consolidator` ``key_fn``)."""
        return self._pool_one(hidden, query=False)[0]

    def query_numpy(self, hidden) -> np.ndarray:
        """A question's hidden states (n, d) -> its query (1, dim) float32 for ``SemanticStore.search``."""
        return self._pool_one(hidden, query=True)


def _padded(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors (n_i, d) -> (N, max n, d) zero-padded and its (N, max n) mask."""
    n = max(t.shape[0] for t in items)
    out = items[0].new_zeros(len(items), n, items[0].shape[1])
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, t in enumerate(items):
        out[i, :len(t)], mask[i, :len(t)] = t, True
    return out, mask


@dataclass
class RetrievalExample:
    """query: a question's hidden states (n, d); chunks: the hidden states of every chunk of its
    document [(n_i, d)]; positive: the index of the chunk that answers it."""

    query: torch.Tensor
    chunks: list[torch.Tensor]
    positive: int


def fit_retriever(retriever: Retriever, examples: list[RetrievalExample], epochs: int = 30, lr: float = 3e-3,
                  batch_size: int = 32, generator: torch.Generator | None = None) -> list[float]:
    """InfoNCE: each query against its document's chunks (softmax over cosines / temperature), AdamW
    over shuffled minibatches of examples; returns each epoch's mean loss."""
    if not examples:
        raise ConfigError("fit_retriever needs at least one example")
    opt = torch.optim.AdamW(retriever.parameters(), lr=lr, weight_decay=0.0)
    history = []
    retriever.train()
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            loss = retrieval_loss(retriever, [examples[i] for i in order[start:start + batch_size]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * min(batch_size, len(order) - start)
        history.append(total / len(order))
    retriever.eval()
    return history


def retrieval_loss(retriever: Retriever, batch: list[RetrievalExample]) -> torch.Tensor:
    """Mean InfoNCE loss of a batch of examples."""
    q, qmask = _padded([e.query for e in batch])
    queries = retriever.pool(q, qmask, query=True)  # (B, dim)
    losses = []
    for i, e in enumerate(batch):
        c, cmask = _padded(e.chunks)
        keys = retriever.pool(c, cmask)  # (n_chunks, dim)
        logits = keys @ queries[i] / retriever.config.temperature
        losses.append(F.cross_entropy(logits[None], torch.tensor([e.positive])))
    return torch.stack(losses).mean()


@torch.no_grad()
def retrieval_accuracy(retriever: Retriever, examples: list[RetrievalExample]) -> float:
    """Share of examples whose answering chunk is the nearest key to the query (recall@1)."""
    hits = 0
    for e in examples:
        c, cmask = _padded(e.chunks)
        keys = retriever.pool(c, cmask)
        q = retriever.pool(e.query[None], query=True)[0]
        hits += int(int((keys @ q).argmax()) == e.positive)
    return hits / max(len(examples), 1)
