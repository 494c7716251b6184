"""A naive HRMLM: the seed's formulas as a plain per-token loop over the parameters of an
``HRMLM`` (every cell input concatenated, every gate computed separately, the vocabulary
projection inside the loop). The tests check the fast model against it; the speed benchmark
uses it as the per-token-loop baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gru_step(cell, inp: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One step of a hiermem GRUCell from its definition: per gate g in (r, z, n),
    a_g = W_ig inp (+ b_ig, or layer norm), b_g = W_hg h (+ b_hg, or layer norm)."""
    H = cell.hidden_size

    def gate(weight, vec, g, norm_w, norm_b, bias):
        pre = vec @ weight[g * H:(g + 1) * H].t()
        if cell.layer_norm:
            return F.layer_norm(pre, (H,), norm_w[g * H:(g + 1) * H], norm_b[g * H:(g + 1) * H])
        return pre + bias[g * H:(g + 1) * H]

    def a(g):
        return gate(cell.weight_ih, inp, g, getattr(cell, "norm_ih_weight", None),
                    getattr(cell, "norm_ih_bias", None), getattr(cell, "bias_ih", None))

    def b(g):
        return gate(cell.weight_hh, h, g, getattr(cell, "norm_hh_weight", None),
                    getattr(cell, "norm_hh_bias", None), getattr(cell, "bias_hh", None))

    r = torch.sigmoid(a(0) + b(0))
    z = torch.sigmoid(a(1) + b(1))
    n = torch.tanh(a(2) + r * b(2))
    return (1 - z) * n + z * h


def naive_forward(model, input_ids: torch.Tensor, low: torch.Tensor | None = None,
                  high: torch.Tensor | None = None):
    """logits (B, L, V), per-token low (B, L, H_l) and high (B, L, H_h) states, and the final
    (low, high), computed token by token exactly as the formulas read."""
    c = model.config
    B, L = input_ids.shape
    w = model.embedding.weight
    low = w.new_zeros(B, c.n_hidden) if low is None else low
    high = w.new_zeros(B, c.n_high_hidden) if high is None else high
    logits, lows, highs = [], [], []
    for t in range(L):
        x = model.embedding(input_ids[:, t])
        for _ in range(c.N):
            for _ in range(c.T):
                low = gru_step(model.low, torch.cat([x, high], dim=-1), low)
            high = gru_step(model.high, low, high)
        logits.append(high @ model.output_weight.t() + model.head_bias)
        lows.append(low)
        highs.append(high)
    return torch.stack(logits, 1), torch.stack(lows, 1), torch.stack(highs, 1), (low, high)
