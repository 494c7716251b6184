"""Long-document perplexity and bits per byte of a model and its variants, against backbone baselines.

One rule for every method: tokens 1..T-1 of a document are scored, each exactly once, token t from
the method's own state after reading token t-1. Perplexity is ``exp(sum NLL / tokens)`` and bits per
byte ``sum NLL / (ln 2 * bytes)`` (UTF-8 bytes of the text of the scored tokens) over all scored
tokens (token-weighted, never a mean of per-batch figures), overall and by segment index (token t
belongs to segment ``t // L``), with the token and byte counts behind every figure.

Methods:

- ``model``: the checkpoint as saved, read by its own ``forward`` (:func:`model_nll`); every model
  family has it. The registry's ``eval_variants`` of its model type add ablations, read the same way
  (HMT: ``sensory`` = memory off, only the last k tokens of the previous segment; ``rmt`` = stage 1;
  ``hmt-fifo`` / ``hmt-attention`` = stage 2 with FIFO or attention-based eviction).
- Backbone baselines, for models with a pretrained backbone only: ``chunks`` (the backbone on
  independent chunks of L tokens; the last position of chunk c predicts the first token of chunk
  c+1, as HMT does across segments); ``sliding`` (a window of W tokens, default L, moved by
  ``stride``; ``stride = W`` is ``chunks``, ``stride = 1`` gives every token a full window);
  ``full`` (all previous tokens up to ``full_context``, in independent blocks of that length).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiermem.errors import ConfigError, DataError
from hiermem.models import model_spec
from hiermem.tokenizers import segment_bytes, token_bytes  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

BACKBONE_METHODS = ("chunks", "sliding", "full")
MODEL_METHOD = "model"
HMT_METHODS = dict(model_spec("hmt").eval_variants)  # method -> HMT config overrides (from the registry)
METHODS = BACKBONE_METHODS + tuple(HMT_METHODS)  # the default methods of an HMT checkpoint


def available_methods(spec) -> list[str]:
    """The perplexity methods of a model family (a :class:`~hiermem.models.ModelSpec`)."""
    return [*(BACKBONE_METHODS if spec.pretrained_backbone else ()), MODEL_METHOD, *spec.eval_variants]


def default_methods(spec) -> list[str]:
    """What ``hiermem eval`` runs unless told: the baselines and variants when there are any, else ``model``."""
    return [*(BACKBONE_METHODS if spec.pretrained_backbone else ()), *spec.eval_variants] or [MODEL_METHOD]


def check_methods(methods, available=METHODS) -> list[str]:
    """Validate method names against ``available`` (order kept, duplicates dropped); one-line ConfigError."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in available]
    if unknown or not methods:
        what = "unknown perplexity method(s)" if unknown else "no perplexity method given"
        hint = ("; the backbone baselines chunks, sliding and full need a model with a pretrained backbone"
                if any(m in BACKBONE_METHODS for m in unknown) else "")
        raise ConfigError(f"{what} {unknown or methods!r}; choose among {', '.join(available)}{hint}")
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
        res = model(input_ids=inputs[:, a:b], cache=past, use_cache=True, logits_to_keep=max(keep, 1))
        past = res.cache
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
def model_nll(model, ids: torch.Tensor, return_recall: bool = False):
    """Per-token NLL (T-1,) of any hiermem model over ``ids`` (T,) read from a fresh state, and its
    recall trace (HMT with ``return_recall``; None otherwise)."""
    extra = {"return_recall": True} if return_recall else {}
    out = model(ids[None].to(model.device), return_logits=False, return_token_nll=True, **extra)
    return out.token_nll[0].float().cpu(), getattr(out, "recall", None)


hmt_nll = model_nll  # the name the lm-eval adapter and benchmarks use


# --- accumulation ---------------------------------------------------------------------------------
@dataclass
class NLLTally:
    """Token-weighted NLL sums, token and byte counts overall and by segment index (token t -> t // L).

    ``bytes`` is None once a document was added without byte counts (bits per byte unknown).
    """

    segment_length: int
    sums: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    bytes: list[int] | None = field(default_factory=list)

    def add(self, nll: torch.Tensor, nbytes: list[int] | None = None) -> None:
        """Fold in one document's per-token NLL (T-1,) for tokens 1..T-1 and, optionally, the UTF-8
        bytes of those tokens' text by segment (:func:`segment_bytes`)."""
        seg = torch.arange(1, nll.shape[0] + 1) // self.segment_length  # (T-1,)
        n = int(seg[-1]) + 1 if nll.numel() else 0
        if nbytes is not None and len(nbytes) != n:
            raise ValueError(f"{len(nbytes)} byte counts for {n} segments")
        sums = torch.bincount(seg, weights=nll.double(), minlength=n).tolist()
        counts = torch.bincount(seg, minlength=n).tolist()
        grow = max(0, n - len(self.sums))
        self.sums += [0.0] * grow
        self.counts += [0] * grow
        if self.bytes is not None and nbytes is None:
            self.bytes = None
        if self.bytes is not None:
            self.bytes += [0] * (len(self.sums) - len(self.bytes))
        for j in range(n):
            self.sums[j] += sums[j]
            self.counts[j] += counts[j]
            if self.bytes is not None:
                self.bytes[j] += int(nbytes[j])

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def summary(self) -> dict:
        return _figure(sum(self.sums), self.tokens, None if self.bytes is None else sum(self.bytes))

    def by_segment(self) -> list[dict]:
        nbytes = self.bytes if self.bytes is not None else [None] * len(self.sums)
        return [{"segment": j, **_figure(s, c, b)} for j, (s, c, b) in enumerate(zip(self.sums, self.counts, nbytes))]


def _figure(nll_sum: float, tokens: int, nbytes: int | None = None) -> dict:
    """ppl, mean NLL and tokens; with a byte count, bpb (bits per UTF-8 byte) and bytes."""
    mean = nll_sum / tokens if tokens else float("nan")
    out = {"ppl": math.exp(mean) if tokens else float("nan"), "nll": mean, "tokens": tokens}
    if nbytes is not None:
        out["bpb"] = nll_sum / (math.log(2) * nbytes) if nbytes > 0 else float("nan")
        out["bytes"] = nbytes
    return out


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


def check_documents(docs: list[TokenDocument], segment_length: int, min_tokens: int | None = None) -> None:
    """Every document needs ``min_tokens`` tokens (default: more than one segment, else memory is never used)."""
    if not docs:
        raise DataError("no documents to evaluate")
    need = segment_length + 1 if min_tokens is None else min_tokens
    short = [(d.id, int(d.ids.shape[0])) for d in docs if d.ids.shape[0] < need]
    if short:
        what = f"longer than one segment ({segment_length} tokens)" if need == segment_length + 1 else \
            f"at least {need} tokens long"
        raise DataError(f"{len(short)} document(s) are not {what}, e.g. {short[0][0]!r} with {short[0][1]} "
                        "tokens; drop them or use shorter segments")


def score_model(model, docs: list[TokenDocument], segment_length: int, tokenizer=None) -> NLLTally:
    """One model's :class:`NLLTally` over ``docs`` (each read from a fresh state by :func:`model_nll`),
    with bytes (bits per byte) when ``tokenizer`` is given: ``score_model(m, docs, L, m.tokenizer)``."""
    tally = NLLTally(segment_length)
    for doc in docs:
        nll, _ = model_nll(model, doc.ids)
        tally.add(nll, segment_bytes(tokenizer, doc.ids, segment_length) if tokenizer is not None else None)
    return tally


def _recalls(cfg) -> bool:
    """Whether a model recalls from a memory bank (HMT stage 2 with memory on): it has recall traces."""
    return getattr(cfg, "stage", None) == 2 and getattr(cfg, "use_memory", True)


def _model_settings(cfg) -> dict:
    if hasattr(cfg, "stage"):  # HMT: the fields its ablations change
        return {k: getattr(cfg, k) for k in ("use_memory", "stage", "eviction", "cache_size", "sensory_length",
                                              "segment_bos")}
    return {"model_type": getattr(cfg, "model_type", None),
            **{k: getattr(cfg, k) for k in ("context_length", "stride") if hasattr(cfg, k)}}


def evaluate_perplexity(models: dict, backbone, docs: list[TokenDocument], methods=None,
                        segment_length: int | None = None, window: int | None = None, stride: int | None = None,
                        full_context: int | None = None, bos_token_id: int | None = None, batch_size: int = 8,
                        block: int = 512, recall: bool = False, tokenizer=None) -> PerplexityResult:
    """Score ``docs`` with every method in ``methods``, on the same tokens.

    models: method name -> hiermem model (``model`` and the variants of one checkpoint), each read by
    :func:`model_nll`. backbone: the bare HF causal LM of the baselines (None: no baselines).
    methods: default every baseline (with a backbone) and every model given. segment_length: L of the
    chunks and of the by-segment figures (default: the models' ``segment_length``). window (default
    L) and stride (default window // 2) set the sliding window; full_context caps the full-context
    baseline (default: the backbone's maximum positions). recall: keep the recall traces of stage-2
    HMT models (diagnostics). tokenizer: decodes the ids to count bytes (bits per byte); None: no bpb.
    """
    available = [*(BACKBONE_METHODS if backbone is not None else ()), *models]
    methods = check_methods(available if methods is None else methods, available)
    used = [models[m] for m in methods if m in models]
    lengths = {m.config.segment_length for m in used if getattr(m.config, "segment_length", None)}
    if len(lengths) > 1 or (segment_length is None and not lengths):
        raise ConfigError(f"the models must share one segment length (got {sorted(lengths)}); for models "
                          "without one give segment_length")
    L = segment_length or lengths.pop()
    check_documents(docs, L, None if lengths or set(methods) & set(BACKBONE_METHODS) else 2)
    window = window or L
    stride = stride or max(1, window // 2)
    spans, bos_extra = {}, int(bos_token_id is not None)
    if backbone is not None:
        max_pos = getattr(backbone.config, "max_position_embeddings", None) or 2048
        full_context = min(full_context or max_pos, max_pos - bos_extra)
        if window + bos_extra > max_pos:
            raise ConfigError(f"window {window} exceeds the backbone's {max_pos} positions")
        spans = {"chunks": (L, L), "sliding": (window, stride), "full": (full_context, full_context)}
    tallies = {m: NLLTally(L) for m in methods}
    traces: dict[str, list] = {m: [] for m in methods if recall and m in models and _recalls(models[m].config)}
    per_doc = []
    for d, doc in enumerate(docs):
        nbytes = segment_bytes(tokenizer, doc.ids, L) if tokenizer is not None else None
        row = {"id": doc.id, "tokens": int(doc.ids.shape[0]) - 1}
        if nbytes is not None:
            row["bytes"] = sum(nbytes)
        for m in methods:
            if m in spans:
                nll = window_nll(backbone, doc.ids, *spans[m], bos_token_id=bos_token_id,
                                 batch_size=batch_size if spans[m][0] <= block else 1, block=block)
            else:
                nll, trace = model_nll(models[m], doc.ids, return_recall=m in traces)
                if m in traces:
                    traces[m].append(trace)
            if nll.shape[0] != doc.ids.shape[0] - 1:
                raise RuntimeError(f"{m} scored {nll.shape[0]} tokens of {doc.id}, expected {doc.ids.shape[0] - 1}")
            tallies[m].add(nll, nbytes)
            fig = _figure(float(nll.double().sum()), nll.shape[0], row.get("bytes"))
            row[m] = fig["ppl"]
            if "bpb" in fig:
                row.setdefault("bpb", {})[m] = fig["bpb"]
        per_doc.append(row)
        log.info("document %d/%d %s (%d tokens): %s", d + 1, len(docs), doc.id, row["tokens"],
                 ", ".join(f"{m} {row[m]:.2f}" for m in methods))
    settings = {"segment_length": L, "window": window, "stride": stride, "full_context": full_context,
                "baseline_bos": bos_token_id is not None, "documents": len(docs),
                "tokens_scored": tallies[methods[0]].tokens}
    if tokenizer is not None:
        settings["bytes_scored"] = sum(r["bytes"] for r in per_doc)
    for m in methods:
        if m in models:
            settings[m] = _model_settings(models[m].config)
    return PerplexityResult(tallies, per_doc, settings, traces)
