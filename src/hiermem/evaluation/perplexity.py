"""Long-document perplexity of HMT against backbone baselines, on the same tokens.

One rule for every method: tokens 1..T-1 of a document are scored, each exactly once, token t from
the method's own state after reading token t-1. Perplexity is ``exp(sum NLL / tokens)`` over all
scored tokens (token-weighted, never a mean of per-batch perplexities), overall and by segment index
(token t belongs to segment ``t // L``), with the token count behind every figure.

Methods:

- ``chunks``: the backbone on independent chunks of L tokens; the last position of chunk c predicts
  the first token of chunk c+1, as HMT does across segments.
- ``sliding``: the backbone over a window of W tokens (default L) moved by ``stride`` tokens; each
  token is predicted from the W - stride + 1 .. W tokens before it (fewer at the document start).
  ``stride = W`` is ``chunks``; ``stride = 1`` gives every token a full window.
- ``full``: the backbone with all previous tokens up to ``full_context`` (default: its maximum
  positions), in independent blocks of that length.
- ``sensory``: the HMT checkpoint with memory off: each segment read after the last k tokens of the
  previous one (sensory memory alone, the ablation that shows what the memory embedding adds).
- ``rmt``: HMT stage 1 (RMT + sensory memory); ``hmt-fifo`` / ``hmt-attention``: HMT stage 2 with
  FIFO or attention-based eviction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiermem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BACKBONE_METHODS = ("chunks", "sliding", "full")
HMT_METHODS = {"sensory": {"use_memory": False}, "rmt": {"stage": 1},
               "hmt-fifo": {"stage": 2, "eviction": "fifo"}, "hmt-attention": {"stage": 2, "eviction": "attention"}}
METHODS = BACKBONE_METHODS + tuple(HMT_METHODS)


def check_methods(methods) -> list[str]:
    """Validate method names (order kept, duplicates dropped)."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown perplexity method(s) {unknown or methods!r}; choose among {', '.join(METHODS)}")
    return methods


# --- backbone baselines: windows over the document -----------------------------------------------
@dataclass(frozen=True)
class Window:
    """Read tokens [start, end); score the predictions made at positions [score_from, end)."""

    start: int
    score_from: int
    end: int


def plan_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows that score every position 0..T-2 (i.e. tokens 1..T-1) exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise ConfigError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    last = num_tokens - 1  # positions < last have a next token to predict
    if last < 1:
        return []
    windows = [Window(0, 0, min(window, last))]
    while windows[-1].end < last:
        end = windows[-1].end + stride  # the last window is cut short, keeping its start
        windows.append(Window(max(0, end - window), windows[-1].end, min(end, last)))
    return windows


def _next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, k, V), targets (B, k) -> NLL (B, k) in float32 (float64 for float64 models)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # flattened: the class axis stays contiguous (a transposed (B, V, k) input is ~5x slower on CPU)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


@torch.no_grad()
def _score_inputs(model, inputs: torch.Tensor, targets: torch.Tensor, block: int) -> torch.Tensor:
    """NLL (B, k) of ``targets`` (B, k) predicted at the last k positions of ``inputs`` (B, n).

    Inputs longer than ``block`` go through the backbone in blocks with its KV cache, so no more
    than ``block`` positions of logits exist at once.
    """
    n, k = inputs.shape[1], targets.shape[1]
    if n <= block:
        return _next_token_nll(model(input_ids=inputs, use_cache=False, logits_to_keep=k).logits, targets)
    past, out, first_scored = None, [], n - k
    for a in range(0, n, block):
        b = min(a + block, n)
        keep = max(0, b - max(a, first_scored))
        res = model(input_ids=inputs[:, a:b], past_key_values=past, use_cache=True, logits_to_keep=max(keep, 1))
        past = res.past_key_values
        if keep:
            done = sum(o.shape[1] for o in out)
            out.append(_next_token_nll(res.logits[:, -keep:], targets[:, done:done + keep]))
    return torch.cat(out, dim=1)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, window: int, stride: int, bos_token_id: int | None = None,
               batch_size: int = 8, block: int = 512) -> torch.Tensor:
    """Per-token NLL (T-1,) of a HF causal LM over ``ids`` (T,) read through sliding windows.

    ``bos_token_id``: prepended to every window (backbones that need BOS, e.g. Gemma), never scored.
    Windows of equal shape are batched ``batch_size`` at a time.
    """
    plan = plan_windows(ids.shape[0], window, stride)
    ids = ids.to(model.device)
    prefix = ids.new_full((1,), bos_token_id) if bos_token_id is not None else ids[:0]
    out, i = [], 0
    while i < len(plan):
        shape = (plan[i].end - plan[i].start, plan[i].end - plan[i].score_from)
        group = [plan[i]]
        while (len(group) < batch_size and i + len(group) < len(plan)
               and (plan[i + len(group)].end - plan[i + len(group)].start,
                    plan[i + len(group)].end - plan[i + len(group)].score_from) == shape):
            group.append(plan[i + len(group)])
        inputs = torch.stack([torch.cat([prefix, ids[w.start:w.end]]) for w in group])  # (G, 1? + n)
        targets = torch.stack([ids[w.score_from + 1:w.end + 1] for w in group])  # (G, k)
        out.append(_score_inputs(model, inputs, targets, block).reshape(-1).cpu())
        i += len(group)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def hmt_nll(model, ids: torch.Tensor, return_recall: bool = False):
    """Per-token NLL (T-1,) of HMT over ``ids`` (T,) read from a fresh memory, and its recall trace."""
    out = model(ids[None].to(model.device), return_logits=False, return_token_nll=True,
                return_recall=return_recall)
    return out.token_nll[0].cpu(), out.recall


# --- accumulation ---------------------------------------------------------------------------------
@dataclass
class NLLTally:
    """Token-weighted NLL sums overall and by segment index (token t -> segment t // L)."""

    segment_length: int
    sums: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def add(self, nll: torch.Tensor) -> None:
        """Fold in one document's per-token NLL (T-1,) for tokens 1..T-1."""
        seg = torch.arange(1, nll.shape[0] + 1) // self.segment_length  # (T-1,)
        n = int(seg[-1]) + 1 if nll.numel() else 0
        sums = torch.bincount(seg, weights=nll.double(), minlength=n).tolist()
        counts = torch.bincount(seg, minlength=n).tolist()
        grow = max(0, n - len(self.sums))
        self.sums += [0.0] * grow
        self.counts += [0] * grow
        for j in range(n):
            self.sums[j] += sums[j]
            self.counts[j] += counts[j]

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def summary(self) -> dict:
        return _figure(sum(self.sums), self.tokens)

    def by_segment(self) -> list[dict]:
        return [{"segment": j, **_figure(s, c)} for j, (s, c) in enumerate(zip(self.sums, self.counts))]


def _figure(nll_sum: float, tokens: int) -> dict:
    mean = nll_sum / tokens if tokens else float("nan")
    return {"ppl": math.exp(mean) if tokens else float("nan"), "nll": mean, "tokens": tokens}


# --- the comparison -------------------------------------------------------------------------------
@dataclass
class TokenDocument:
    """A tokenised document: its id and token ids (T,)."""

    id: str
    ids: torch.Tensor


@dataclass
class PerplexityResult:
    """Overall and by-segment figures per method, per-document figures, settings and recall traces."""

    tallies: dict[str, NLLTally]
    documents: list[dict]
    settings: dict
    traces: dict[str, list] = field(default_factory=dict)  # method -> one recall trace per document

    def to_dict(self) -> dict:
        return {"settings": self.settings,
                "methods": {m: {**t.summary(), "by_segment": t.by_segment()} for m, t in self.tallies.items()},
                "documents": self.documents}


def check_documents(docs: list[TokenDocument], segment_length: int) -> None:
    """Every document must be longer than one segment (else memory is never used)."""
    if not docs:
        raise DataError("no documents to evaluate")
    short = [(d.id, int(d.ids.shape[0])) for d in docs if d.ids.shape[0] <= segment_length]
    if short:
        raise DataError(f"{len(short)} document(s) are not longer than one segment ({segment_length} tokens), "
                        f"e.g. {short[0][0]!r} with {short[0][1]} tokens; drop them or use shorter segments")


def evaluate_perplexity(models: dict, backbone, docs: list[TokenDocument], methods=METHODS,
                        segment_length: int | None = None, window: int | None = None, stride: int | None = None,
                        full_context: int | None = None, bos_token_id: int | None = None, batch_size: int = 8,
                        block: int = 512, recall: bool = False) -> PerplexityResult:
    """Score ``docs`` with every method in ``methods``, on the same tokens.

    models: HMT-method name -> HMT model (the variants of one checkpoint); backbone: the bare HF
    causal LM for the baselines. segment_length: L of the chunks and of the by-segment figures
    (default: the HMT models'). window (default L) and stride (default window // 2) set the sliding
    window; full_context caps the full-context baseline (default: the backbone's maximum positions).
    recall: keep the stage-2 HMT recall traces for the diagnostics.
    """
    methods = check_methods(methods)
    missing = [m for m in methods if m in HMT_METHODS and m not in models]
    if missing:
        raise ConfigError(f"no HMT model given for {missing}")
    lengths = {m.config.segment_length for m in models.values()}
    if len(lengths) > 1 or (segment_length is None and not lengths):
        raise ConfigError(f"the HMT models must share one segment length (got {sorted(lengths)}); without HMT "
                          "models give segment_length")
    L = segment_length or lengths.pop()
    check_documents(docs, L)
    window = window or L
    stride = stride or max(1, window // 2)
    max_pos = getattr(backbone.config, "max_position_embeddings", None) or 2048
    bos_extra = int(bos_token_id is not None)
    full_context = min(full_context or max_pos, max_pos - bos_extra)
    if window + bos_extra > max_pos:
        raise ConfigError(f"window {window} exceeds the backbone's {max_pos} positions")
    spans = {"chunks": (L, L), "sliding": (window, stride), "full": (full_context, full_context)}
    tallies = {m: NLLTally(L) for m in methods}
    traces: dict[str, list] = {m: [] for m in methods if recall and HMT_METHODS.get(m, {}).get("stage") == 2}
    per_doc = []
    for d, doc in enumerate(docs):
        row = {"id": doc.id, "tokens": int(doc.ids.shape[0]) - 1}
        for m in methods:
            if m in spans:
                nll = window_nll(backbone, doc.ids, *spans[m], bos_token_id=bos_token_id,
                                 batch_size=batch_size if spans[m][0] <= block else 1, block=block)
            else:
                nll, trace = hmt_nll(models[m], doc.ids, return_recall=m in traces)
                if m in traces:
                    traces[m].append(trace)
            if nll.shape[0] != doc.ids.shape[0] - 1:
                raise RuntimeError(f"{m} scored {nll.shape[0]} tokens of {doc.id}, expected {doc.ids.shape[0] - 1}")
            tallies[m].add(nll)
            row[m] = _figure(float(nll.double().sum()), nll.shape[0])["ppl"]
        per_doc.append(row)
        log.info("document %d/%d %s (%d tokens): %s", d + 1, len(docs), doc.id, row["tokens"],
                 ", ".join(f"{m} {row[m]:.2f}" for m in methods))
    settings = {"segment_length": L, "window": window, "stride": stride, "full_context": full_context,
                "baseline_bos": bos_token_id is not None, "documents": len(docs),
                "tokens_scored": tallies[methods[0]].tokens}
    for m in methods:
        if m in HMT_METHODS:
            cfg = models[m].config
            settings[m] = {"use_memory": cfg.use_memory, "stage": cfg.stage, "eviction": cfg.eviction,
                           "cache_size": cfg.cache_size, "sensory_length": cfg.sensory_length,
                           "segment_bos": cfg.segment_bos}
    return PerplexityResult(tallies, per_doc, settings, traces)
