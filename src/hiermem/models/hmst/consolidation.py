"""Consolidation: HMST's episodic content written into the semantic store.

Policy (``ConsolidationPolicy``):

- **What** is written: one entry per chunk of at most ``chunk_tokens`` consecutive tokens of the
  stream (with ``boundary_tokens``, e.g. the newline ids, a chunk ends after its last boundary token
  when it holds one, so lines are not cut): the chunk's real token ids (and its text when a
  ``decode`` function is given), the source name, its token span ``start``/``end`` in the stream,
  and as key the mean of the model's final hidden states over the chunk
  (``HMST(..., return_hidden=True).hidden``), or ``key_fn`` of them (a trained
  :class:`~hiermem.models.hmst.retriever.Retriever`); the store normalises keys, so search is by cosine.
- **When**: a chunk is written once it has left the attention window, i.e. once the model has read
  ``attention_window`` tokens past its last token; from then on only the episodic SSM carries it.
  Eligible chunks are written every ``every_tokens`` tokens read (one batch of store writes), and
  ``flush()`` writes the rest (e.g. at the end of a document), the last chunk possibly shorter.
- **Deduplication**: a chunk is skipped when an entry with exactly the same tokens and text exists
  (digest match), or when its key has cosine >= ``dedup_threshold`` with the nearest stored key (set
  ``dedup_threshold`` above 1 to keep near duplicates). Chunks shorter than ``min_tokens`` are skipped.

The consolidator holds at most ``attention_window + chunk_tokens + every_tokens`` tokens and their
hidden states, whatever the stream's length. One consolidator follows one stream (one batch row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hiermem.errors import ConfigError
from hiermem.io import check_ints
from hiermem.memory.semantic import Hit, SemanticStore


@dataclass
class ConsolidationPolicy:
    """See the module docstring. attention_window: the model's W (None: take it from the model)."""

    chunk_tokens: int = 64
    every_tokens: int = 256
    dedup_threshold: float = 0.98
    min_tokens: int = 8
    attention_window: int | None = None
    boundary_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        check_ints(self, ("chunk_tokens", "every_tokens", "min_tokens"), what="consolidation ")
        check_ints(self, ("attention_window",), allow_none=True, what="consolidation ")
        if not isinstance(self.dedup_threshold, (int, float)) or not -1 <= self.dedup_threshold:
            raise ConfigError(f"dedup_threshold must be a cosine in [-1, 1] (or above 1 to keep near duplicates), "
                              f"got {self.dedup_threshold!r}")
        self.boundary_tokens = tuple(int(t) for t in self.boundary_tokens)


def chunk_spans(tokens, chunk_tokens: int, boundary_tokens=(), final: bool = True) -> list[tuple[int, int]]:
    """Split tokens (n,) into consecutive spans [a, b) of at most ``chunk_tokens``: a span ends after
    its last boundary token when it holds one (and is not the stream's end), else after
    ``chunk_tokens``. Without ``final``, a trailing span that could still grow is left out."""
    n, spans, a = len(tokens), [], 0
    marks = np.isin(np.asarray(tokens), np.asarray(boundary_tokens, dtype=np.int64)) if boundary_tokens else None
    while a < n:
        b = min(a + chunk_tokens, n)
        if b - a < chunk_tokens and not final:
            break  # more tokens may join this span
        if marks is not None and not (final and b == n):
            inner = np.flatnonzero(marks[a:b])
            if len(inner):
                b = a + int(inner[-1]) + 1
        spans.append((a, b))
        a = b
    return spans


@dataclass
class ConsolidationStats:
    written: int = 0
    skipped_exact: int = 0
    skipped_similar: int = 0
    skipped_short: int = 0
    ids: list[int] = field(default_factory=list)  # ids written, in order


class Consolidator:
    """Feeds one token stream's (tokens, hidden states) into ``store`` by ``policy``.

    decode: token ids -> text, stored beside the ids (e.g. ``tokenizer.decode``); source: a name for
    the stream (document, session), stored with every entry and usable in ``store.find(source=...)``.
    """

    def __init__(self, store: SemanticStore, policy: ConsolidationPolicy, decode: Callable | None = None,
                 source: str | None = None, key_fn: Callable | None = None):
        if policy.attention_window is None:
            raise ConfigError("the policy needs attention_window (use Consolidator.for_model)")
        self.store, self.policy, self.decode, self.source = store, policy, decode, source
        self.key_fn = key_fn or (lambda h: h.mean(0))  # (n, d) hidden states -> (store.dim,) key
        self.tokens = np.zeros(0, dtype=np.int64)  # (n,) pending tokens, the first at stream position self.start
        self.hidden = None  # (n, d) their hidden states, once the first ones arrive
        self.start = 0  # stream position of self.tokens[0]
        self.read = 0  # tokens read so far
        self.last_check = 0
        self.stats = ConsolidationStats()

    @classmethod
    def for_model(cls, model, store: SemanticStore, policy: ConsolidationPolicy | None = None, retriever=None,
                  **kw) -> Consolidator:
        """A consolidator using ``model``'s attention window and a store of its hidden size (or of the
        key size of ``retriever``, whose chunk keys it then writes)."""
        policy = policy or ConsolidationPolicy()
        if policy.attention_window is None:
            policy = ConsolidationPolicy(**{**asdict(policy), "attention_window": model.config.attention_window})
        dim, what = model.config.hidden_size, "the model's hidden size"
        if retriever is not None:
            dim, what, kw["key_fn"] = retriever.config.dim, "the retriever's key size", retriever.key_numpy
        if store.dim != dim:
            raise ConfigError(f"the store holds dim {store.dim} vectors, {what} is {dim}")
        return cls(store, policy, **kw)

    def observe(self, tokens, hidden) -> list[int]:
        """Take the next tokens (T,) or (1, T) and their final hidden states (T, d) or (1, T, d);
        returns the ids written now."""
        tokens = torch.as_tensor(tokens).reshape(-1).cpu().numpy().astype(np.int64)
        hidden = torch.as_tensor(hidden).detach().float()
        hidden = hidden.reshape(-1, hidden.shape[-1]).cpu().numpy()
        if len(tokens) != len(hidden):
            raise ConfigError(f"{len(tokens)} tokens but {len(hidden)} hidden states (one consolidator per batch row)")
        self.tokens = np.concatenate([self.tokens, tokens])
        self.hidden = hidden if self.hidden is None else np.concatenate([self.hidden, hidden])
        self.read += len(tokens)
        if self.read - self.last_check < self.policy.every_tokens:
            return []
        self.last_check = self.read - (self.read - self.last_check) % self.policy.every_tokens
        eligible = max(0, self.read - self.policy.attention_window - self.start)  # tokens W behind the newest
        return self._write(eligible, final=False)

    def flush(self) -> list[int]:
        """Write every pending token (the stream ended), the last chunk possibly shorter."""
        return self._write(len(self.tokens), final=True)

    def _write(self, count: int, final: bool) -> list[int]:
        """Write the chunks of the first ``count`` pending tokens (a last one that could still grow
        stays pending unless ``final``) and drop what was written from the buffer."""
        p, keys, payloads = self.policy, [], []
        spans = chunk_spans(self.tokens[:count], p.chunk_tokens, p.boundary_tokens, final)
        for a, b in spans:
            toks = self.tokens[a:b]
            if len(toks) < p.min_tokens:
                self.stats.skipped_short += 1
                continue
            text = self.decode(toks.tolist()) if self.decode is not None else None
            if self.store.find_duplicate(toks, text) is not None or any(
                    np.array_equal(toks, q["tokens"]) and text == q["text"] for q in payloads):
                self.stats.skipped_exact += 1
                continue
            key = np.asarray(self.key_fn(self.hidden[a:b]), dtype=np.float32)  # (store.dim,)
            if self._similar(key, keys):
                self.stats.skipped_similar += 1
                continue
            keys.append(key)
            payloads.append({"tokens": toks, "text": text, "source": self.source,
                             "start": self.start + a, "end": self.start + a + len(toks)})
        done = spans[-1][1] if spans else 0
        self.tokens, self.start = self.tokens[done:], self.start + done
        self.hidden = self.hidden[done:] if self.hidden is not None else None
        if not keys:
            return []
        ids = self.store.add(np.stack(keys), payloads).tolist()
        self.stats.written += len(ids)
        self.stats.ids += ids
        return ids

    def _similar(self, key: np.ndarray, batch: list[np.ndarray]) -> bool:
        """Cosine of ``key`` with the nearest stored key, or with a key of this batch, >= the threshold."""
        t = self.policy.dedup_threshold
        if t > 1:
            return False
        u = key / max(float(np.linalg.norm(key)), 1e-12)
        if any(float(u @ (b / max(float(np.linalg.norm(b)), 1e-12))) >= t for b in batch):
            return True
        hits = self.store.search(key[None], 1)[0]
        return bool(hits) and hits[0].score >= t

    def recall(self, keys, k: int = 5) -> list[list[Hit]]:
        """Stored chunks nearest to keys (q, d) (e.g. mean hidden states of a query): their tokens,
        text and metadata in each ``Hit.payload``."""
        return self.store.search(keys, k)


@torch.no_grad()
def read_and_consolidate(model, input_ids, consolidator: Consolidator, call_tokens: int | None = None,
                         state=None, flush: bool = True):
    """Read a long stream input_ids (T,) or (1, T) with HMST in calls of ``call_tokens`` tokens
    (default: the policy's every_tokens) with the state carried, feeding the consolidator.
    Returns the final model state."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    step = call_tokens or consolidator.policy.every_tokens
    for a in range(0, ids.shape[1], step):
        out = model(ids[:, a:a + step], state=state, return_logits=False, return_hidden=True)
        state = out.state
        consolidator.observe(ids[0, a:a + step], out.hidden[0])
    if flush:
        consolidator.flush()
    return state
