"""Transformer: a small Llama-style causal LM trained from scratch, read with a sliding window.

The network is ``transformers.LlamaForCausalLM`` built in process from :class:`TransformerConfig`
(no modeling code copied). Attention spans at most C = ``context_length`` tokens, so any input is
read in passes (positions restart at 0 in every pass):

- the first pass reads [tail, x[:C - len(tail)]] (``tail``: the state's last tokens, maybe none);
- every later pass reads [the last C - S tokens read so far, the next S new tokens] (S = stride).

Logits are kept for the new tokens of each pass only, so every token but the first of a call is
scored exactly once; the state keeps the last C - S tokens read. With an empty state and
T <= C a call is one ordinary causal-LM pass. Chunked calls carrying the state equal one call
when chunks end on pass boundaries (first C - len(tail) tokens, then multiples of S).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from hiermem.models.base import (Decoder, HiermemModel, ModelOutput,
                                 next_token_nll)
from hiermem.models.state import ModelState, batch_field
from hiermem.models.transformer.config import TransformerConfig

log = logging.getLogger(__name__)


@dataclass
class TransformerState(ModelState):
    """tail: (B, t <= C - S) the last tokens read (context of the next pass); tokens: tokens read."""

    KIND: ClassVar[str] = "transformer-state"
    tail: torch.Tensor = batch_field(0)
    tokens: int = 0


def _last(t: torch.Tensor, k: int) -> torch.Tensor:
    """The last ``k`` columns of ``t`` (B, n) (all of them when n <= k; none when k = 0)."""
    return t[:, max(0, t.shape[1] - k):]


def _promote(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class TransformerDecoder(Decoder):
    """KV-cached incremental reader over the pass in progress; a full window starts a new pass from
    its last C - S tokens (re-encoded), exactly the passes ``Transformer.forward`` makes.

    ``state``: the state when the pass in progress began (its tail is the pass's context);
    ``current``: the new tokens of that pass. ``snapshot()`` returns both, so a decoder rebuilt from
    the state and fed ``current`` reads the same window again.
    """

    def __init__(self, model: "Transformer", state: TransformerState | None = None, batch_size: int = 1,
                 last_logits: torch.Tensor | None = None):
        super().__init__(model, state, batch_size, last_logits)
        self.state = model._fit_state(self.state)
        if last_logits is not None:
            self.last_logits = _promote(last_logits)
        self.window = self.state.tail  # (B, w <= C): tokens of the pass in progress
        self.current = self.window[:, :0]  # (B, c): its new tokens
        self.cache, self.cached = None, 0  # KV cache over window[:, :cached]

    def _restart(self) -> None:
        """The window is full: the next pass starts from its last C - S tokens (KV cache dropped)."""
        tail = _last(self.window, self.model.config.overlap)
        self.state = TransformerState(tail=tail, tokens=self.state.tokens + self.current.shape[1])
        self.window, self.current = tail, tail[:, :0]
        self.cache, self.cached = None, 0

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Read ids (B, l >= 1); return logits (B, V) for the token after them."""
        ids = self.check_ids(ids).to(self.window.device)
        C = self.model.config.context_length
        while ids.shape[1]:
            if self.window.shape[1] == C:
                self._restart()
            room = C - self.window.shape[1]
            take, ids = ids[:, :room], ids[:, room:]
            self.window = torch.cat([self.window, take], dim=1)
            self.current = torch.cat([self.current, take], dim=1)
        # only the final pass is encoded: passes restarted within this call need no cache
        out = self.model.lm(input_ids=self.window[:, self.cached:], cache=self.cache, use_cache=True,
                            logits_to_keep=1)
        self.cache, self.cached = out.cache, self.window.shape[1]
        self.last_logits = _promote(out.logits[:, -1])
        return self.last_logits


class Transformer(HiermemModel):
    """Llama-style transformer trained from scratch (``self.lm``: a ``LlamaForCausalLM``).

    Trains all parameters ("full"). ``parameter_groups`` (base): every matrix decays, the tied
    embedding/output matrix included (as nanoGPT does); RMSNorm weights do not.
    """

    config_class: ClassVar[type] = TransformerConfig
    state_class: ClassVar[type] = TransformerState
    decoder_class: ClassVar[type] = TransformerDecoder
    default_trainable: ClassVar[str] = "full"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.config = config
        lm_config = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.kv_heads, max_position_embeddings=config.context_length,
            rope_theta=float(config.rope_theta), attention_dropout=float(config.dropout),
            initializer_range=config.init_std, tie_word_embeddings=config.tie_embeddings, use_cache=False,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=None)
        self.lm = LlamaForCausalLM(lm_config).to(torch.float32)

    # --- protocol ---------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> TransformerState:
        return TransformerState(tail=torch.zeros(batch_size, 0, dtype=torch.long, device=self.device))

    def architecture_fields(self) -> tuple[str, ...]:
        """Fields that change the meaning of a state (training-only ones excluded)."""
        return tuple(k for k in self.config.to_dict() if k not in ("dropout", "init_std"))

    def param_count(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embeddings else n - self.lm.get_input_embeddings().weight.numel() * (
            1 if self.config.tie_embeddings else 2)

    def _fit_state(self, state: TransformerState) -> TransformerState:
        """A tail that cannot fit in one window (another config) is cut to the last C - S tokens."""
        if state.tail.shape[1] >= self.config.context_length:
            return TransformerState(tail=_last(state.tail, self.config.overlap), tokens=state.tokens)
        return state

    def passes(self, history: int, T: int) -> list[tuple[int, int, int]]:
        """(read start, first new, end) of every pass over [tail (``history`` tokens), T new tokens],
        in positions of that concatenation."""
        C, S, keep = self.config.context_length, self.config.stride_tokens, self.config.overlap
        end = min(C, history + T)
        out = [(0, history, end)]
        while end < history + T:
            new, end = end, min(end + S, history + T)
            out.append((new - keep, new, end))
        return out

    def forward(self, input_ids: torch.Tensor, state: TransformerState | None = None,
                labels: torch.Tensor | None = None, return_logits: bool = True,
                return_token_nll: bool = False) -> ModelOutput:
        """Read ``input_ids`` (B, T) after ``state`` in sliding-window passes (see the module doc).

        ``labels`` (B, T): HF convention (shifted inside, -100 ignored). Without ``return_logits``
        no (B, T, V) tensor is made: NLL is computed pass by pass, and when neither labels nor
        per-token NLL are asked for only the last pass runs (passes do not depend on each other).
        """
        state = self._fit_state(self.checked_state(input_ids, state, labels))
        B, T = input_ids.shape
        h = state.tail.shape[1]
        seq = torch.cat([state.tail.to(input_ids.device), input_ids], dim=1)
        new_state = TransformerState(tail=_last(seq, self.config.overlap), tokens=state.tokens + T)
        scoring = labels is not None or return_token_nll
        target = labels if labels is not None else input_ids
        passes = self.passes(h, T)
        if not (return_logits or scoring):
            passes, keep_last = passes[-1:], True
        else:
            keep_last = False
        logits_out, nll_out, last_logits = [], [], None
        for start, new, end in passes:
            n = 1 if keep_last else end - new
            logits = self.lm(input_ids=seq[:, start:end], logits_to_keep=n, use_cache=False).logits  # (B, n, V)
            last_logits = logits[:, -1]
            if return_logits:
                logits_out.append(logits)
            if scoring:
                tgt = target[:, new - h + 1:end - h + 1]  # the token after each new one (none after the last)
                nll_out.append(next_token_nll(logits[:, :tgt.shape[1]], tgt))
        out = ModelOutput(loss=None, state=new_state, last_logits=last_logits,
                          logits=torch.cat(logits_out, dim=1) if return_logits else None)
        if scoring:
            nll = torch.cat(nll_out, dim=1)  # (B, T - 1)
            if return_token_nll:
                out.token_nll = nll.detach()
            if labels is not None:
                out.num_tokens = int((labels[:, 1:] != -100).sum())
                out.nll_sum = nll.sum()
                out.loss = out.nll_sum / max(out.num_tokens, 1)
        return out
