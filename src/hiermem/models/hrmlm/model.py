"""HRMLM: a hierarchical recurrent LM. For each token t, N high-level cycles, each of T low-level
GRU steps then one high-level step::

    h_l <- GRU_low([x_t; h_h], h_l)      (T times)
    h_h <- GRU_high(h_l, h_h)            (then once; the whole cycle N times)
    logits_t = W_o h_h + b_o

The state (h_l, h_h) after the last token is the model's memory: carried across calls, it reads a
document of any length in constant memory, and chunked calls equal one long call exactly.

Speed (the recurrence is sequential, so the work outside it is moved out): the embedding part of
the low cell's input product is one matmul over all tokens; the h_h part is computed once per
high-level cycle (it does not change during the T low steps), fused with the high cell's own
recurrent product into one matmul; the vocabulary projection runs once over all tokens after the
loop; each gate update is five fused element-wise ops. With two or more threads the per-step
products are split between the cores (:class:`~hiermem.models.hrmlm.recurrence.Product`; their
split weights kept between calls without gradients), and so is the few-row output product of
decoding. Scoring without returned logits makes the scored positions' logits as one contiguous block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.models.base import Decoder, HiermemModel, ModelOutput, lm_output, score_next_tokens
from hiermem.models.hrmlm.cells import GRUCell
from hiermem.models.hrmlm.config import HRMLMConfig
from hiermem.models.hrmlm.recurrence import Product, Recurrence, run, use_split
from hiermem.models.state import ModelState, batch_field


@dataclass
class HRMLMState(ModelState):
    """low: (B, n_hidden) h_l; high: (B, n_high_hidden) h_h; tokens: tokens read so far."""

    KIND: ClassVar[str] = "hrmlm-state"
    low: torch.Tensor = batch_field(0)
    high: torch.Tensor = batch_field(0)
    tokens: int = 0


@dataclass
class HRMLMOutput(ModelOutput):
    """ModelOutput plus, with ``return_states=True``, the states after every token:
    low_states (B, T, n_hidden) and high_states (B, T, n_high_hidden) (features for other tasks)."""

    low_states: torch.Tensor | None = None
    high_states: torch.Tensor | None = None


class HRMLM(HiermemModel):
    """Hierarchical recurrent memory LM trained from scratch (see the module docstring).

    Parameters: ``embedding`` (V, E), ``low`` GRUCell(E + H_h -> H_l), ``high`` GRUCell(H_l -> H_h),
    ``head`` (V, H_h) or the embedding when tied, ``head_bias`` (V,).
    """

    config_class: ClassVar[type] = HRMLMConfig
    state_class: ClassVar[type] = HRMLMState
    decoder_class: ClassVar[type] = Decoder  # calls compose: the default decoder is exact
    default_trainable: ClassVar[str] = "full"

    def __init__(self, config: HRMLMConfig):
        super().__init__()
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.n_embd)
        self.low = GRUCell(c.n_embd + c.n_high_hidden, c.n_hidden, c.layer_norm)
        self.high = GRUCell(c.n_hidden, c.n_high_hidden, c.layer_norm)
        self.head = None if c.tie_embeddings else nn.Parameter(torch.empty(c.vocab_size, c.n_high_hidden))
        self.head_bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if self.head is not None:
            nn.init.normal_(self.head, std=0.02)

    # --- protocol ---------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> HRMLMState:
        p = self.embedding.weight
        return HRMLMState(low=p.new_zeros(batch_size, self.config.n_hidden),
                          high=p.new_zeros(batch_size, self.config.n_high_hidden))

    def architecture_fields(self) -> tuple[str, ...]:
        return tuple(k for k in self.config.to_dict() if k not in ("dropout", "n_ctx", "tokenizer"))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.head is None else self.head

    def logits(self, high: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) from high-level states (..., H_h).

        A few rows (decoding) make a matrix-vector product bound by reading the (V, H_h) matrix,
        which the BLAS runs on one thread: with more threads it runs as a batched product over
        four row blocks of the matrix (views, no copy), which the threads share. Same values."""
        high, w, V = self.drop(high), self.output_weight, self.config.vocab_size
        if (high.dim() == 2 and high.shape[0] <= 4 and V % 4 == 0 and w.is_contiguous()
                and torch.get_num_threads() > 1):
            B, H = high.shape
            blocks = torch.baddbmm(self.head_bias.view(4, 1, V // 4), high.expand(4, B, H),
                                   w.view(4, V // 4, H).transpose(1, 2))  # (4, B, V / 4)
            return blocks.transpose(0, 1).reshape(B, V)
        return F.linear(high, w, self.head_bias)

    def norm_params(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Parameters of the (low input, low recurrent, high input, high recurrent) normalisations."""
        return (self.low.norm_params("ih"), self.low.norm_params("hh"), self.high.norm_params("ih"),
                self.high.norm_params("hh"))

    def recur(self, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor):
        """Run the recurrence over embeddings x (B, L, E) from states low (B, H_l), high (B, H_h).

        Returns high states (B, L, H_h) and low states (B, L, H_l) after every token.
        """
        c, lo, hi = self.config, self.low, self.high
        if torch.is_autocast_enabled(x.device.type):  # the recurrence runs in float32 (its backward is hand-written)
            with torch.autocast(x.device.type, enabled=False):
                return self.recur(x.float(), low.float(), high.float())
        x_part = x @ lo.weight_ih[:, :c.n_embd].t()  # (B, L, 3H_l): the embedding part, all tokens at once
        norms = self.norm_params()
        if torch.is_grad_enabled() and (x_part.requires_grad or low.requires_grad or high.requires_grad):
            flat = [p for group in norms for p in group]
            return Recurrence.apply(c.T, c.N, len(norms[0]), x_part, low, high, self.w_next(), lo.weight_hh,
                                    hi.weight_ih, *flat)
        w_next, products = self.inference_products()
        highs, lows, _ = run(x_part, low, high, w_next, lo.weight_hh, hi.weight_ih, norms, c.T, c.N,
                             products=products)
        return highs, lows

    def w_next(self) -> torch.Tensor:
        """(3H_h + 3H_l, H_h): h_h feeds both the high cell's recurrent product and the low cell's
        input, so both weights make one matmul."""
        return torch.cat([self.high.weight_hh, self.low.weight_ih[:, self.config.n_embd:]])

    def inference_products(self):
        """(w_next, its and the cells' per-step products) for a recurrence without gradients, kept
        between calls while the weights are the same tensors, unchanged (same version counter: any
        in-place update through autograd-visible ops, an optimizer step or ``load_state_dict``,
        bumps it) and the thread count allows the same split: decoding one token at a time then
        neither concatenates nor re-splits weights per token."""
        weights = (self.high.weight_hh, self.low.weight_ih, self.low.weight_hh, self.high.weight_ih)
        key = (use_split(16), *((id(w), w._version, w.data_ptr()) for w in weights))
        kept = self.__dict__.get("_inference_products")
        if kept is None or kept[0] != key or any(a is not b for a, b in zip(kept[1], weights)):
            w_next = self.w_next()
            products = tuple(Product(w.t(), key[0]) for w in (w_next, self.low.weight_hh, self.high.weight_ih))
            self.__dict__["_inference_products"] = kept = (key, weights, w_next, products)
        return kept[2], kept[3]

    def scored(self, highs, input_ids, labels, state, return_token_nll: bool) -> HRMLMOutput:
        """The loss / token NLL without the logits returned: the scored positions' logits are made
        as one contiguous (B, L-1, V) block (what :func:`lm_output` would slice and copy out of the
        (B, L, V) logits) and the last position's apart; same values."""
        body = self.logits(highs[:, :-1])
        last = self.logits(highs[:, -1])
        out = HRMLMOutput(loss=None, state=state, last_logits=last)
        return score_next_tokens(out, body, input_ids, labels, return_token_nll)

    def forward(self, input_ids: torch.Tensor, state: HRMLMState | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True, return_token_nll: bool = False,
                return_states: bool = False) -> HRMLMOutput:
        """Read input_ids (B, T) after ``state`` (zeros when None).

        labels (B, T): HF convention (shifted inside, -100 ignored). Without return_logits,
        labels and token NLL only the last position's logits are made (generation, reading).
        """
        state = self.checked_state(input_ids, state, labels)
        B, L = input_ids.shape
        dtype = self.embedding.weight.dtype
        x = self.drop(self.embedding(input_ids))
        highs, lows = self.recur(x, state.low.to(dtype), state.high.to(dtype))
        # own storage (clone, not contiguous(): with B = 1 that is a view) so the state does not keep
        # the (B, L, H) stacks alive, and a resumed run reads it from the same kind of buffer
        new_state = HRMLMState(low=lows[:, -1].clone(), high=highs[:, -1].clone(), tokens=state.tokens + L)
        if return_logits:
            out = HRMLMOutput(**vars(lm_output(self.logits(highs), input_ids, labels, new_state, True,
                                               return_token_nll)))
        elif labels is not None or return_token_nll:
            out = self.scored(highs, input_ids, labels, new_state, return_token_nll)
        else:
            last = self.logits(highs[:, -1])
            out = HRMLMOutput(loss=None, state=new_state, last_logits=last)
        if return_states:
            out.low_states, out.high_states = lows, highs
        return out
