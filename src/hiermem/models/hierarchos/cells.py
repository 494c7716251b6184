"""The RWKV-style recurrent cell of the Hierarchos manager and worker.

One step reads x (B, H) with state (sx, aa, bb, pp, sx_cm), each (B, H)::

    xn = LN1(x);  k, v, r = W_k mix(xn, sx, mu_k), W_v mix(xn, sx, mu_v), W_r mix(xn, sx, mu_r)
    wkv = (e^(pp-p) aa + e^(u+k-p) v) / (e^(pp-p) bb + e^(u+k-p)),      p = max(pp, u + k)
    aa', bb', pp' = e^(pp+w-q) aa + e^(k-q) v,  e^(pp+w-q) bb + e^(k-q),  q,   q = max(pp + w, k)
    x1 = x + W_o (sigmoid(r) * wkv)                                       (time mixing)
    xn2 = LN2(x1);  out = x1 + sigmoid(W_rc mix(xn2, sx_cm, mu_rc)) * W_vc relu(W_kc mix(xn2, sx_cm, mu_kc))^2
    state' = (xn, aa', bb', pp', xn2)

with mix(a, b, mu) = mu * a + (1 - mu) * b (token shift), w = -exp(time_decay) < 0 (the decay)
and u = time_first. aa/bb/pp are the running WKV numerator, denominator and log-scale (stable for
any key size; bb >= 1 after the first step).

Speed: the token shift makes each product a sum of a product with xn and one with sx, so the
three time-mixing products are one matmul of [xn, sx] (B, 2H) with a fused (3H, 2H) matrix, and
the two channel-mixing ones one matmul with a (5H, 2H) matrix. :meth:`RWKVCell.fused` builds
those once per forward call; :func:`cell_step` is the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.models.lora import linear_weight

PP_INIT = -1e30  # log-scale of an empty WKV accumulator (exp(PP_INIT - anything) == 0)
FFN_MULT = 4


class RWKVCell(nn.Module):
    """An RWKV-style cell of width H: time mixing (WKV) then channel mixing (squared ReLU)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = H = hidden
        self.ln1, self.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
        ratio = torch.arange(H, dtype=torch.float32) / max(H - 1, 1)
        self.time_decay = nn.Parameter(-5.0 + 7.0 * ratio)  # w = -exp(d): from slow (-0.007) to fast (-7.4)
        self.time_first = nn.Parameter(torch.full((H,), 0.5))
        curve = ratio.sqrt()
        self.mix = nn.Parameter(torch.stack([curve, curve * 0.9 + 0.1, 0.5 * curve]))  # (3, H): k, v, r
        self.mix_cm = nn.Parameter(torch.full((2, H), 0.5))  # (2, H): k, r of the channel mixing
        self.key, self.value, self.receptance = (nn.Linear(H, H, bias=False) for _ in range(3))
        self.output = nn.Linear(H, H, bias=False)
        self.key_cm = nn.Linear(H, FFN_MULT * H, bias=False)
        self.receptance_cm = nn.Linear(H, H, bias=False)
        self.value_cm = nn.Linear(FFN_MULT * H, H, bias=False)
        with torch.no_grad():  # residual branches start small
            self.output.weight.mul_(0.5)
            self.value_cm.weight.mul_(0.5)

    def init_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """A fresh state (B, 5, H): zeros, with the WKV log-scale pp at PP_INIT."""
        state = like.new_zeros(batch_size, 5, self.hidden)
        state[:, 3] = PP_INIT
        return state

    def fused(self) -> tuple[torch.Tensor, ...]:
        """The step's weights: (ln1 w, ln1 b, ln2 w, ln2 b, u, w, W_tm (3H, 2H), W_o, W_cm (5H, 2H), W_vc)."""
        mix, mix_cm = self.mix, self.mix_cm
        w_kvr = torch.stack([linear_weight(m) for m in (self.key, self.value, self.receptance)])  # (3, H, H)
        w_tm = torch.cat([w_kvr * mix[:, None, :], w_kvr * (1 - mix)[:, None, :]], 2).flatten(0, 1)
        w_kr = [linear_weight(self.key_cm), linear_weight(self.receptance_cm)]  # LoRA deltas included
        w_cm = torch.cat([torch.cat([w * m, w * (1 - m)], 1) for w, m in zip(w_kr, mix_cm)])
        return (self.ln1.weight, self.ln1.bias, self.ln2.weight, self.ln2.bias, self.time_first,
                -torch.exp(self.time_decay), w_tm, linear_weight(self.output), w_cm, linear_weight(self.value_cm))


def cell_step(weights: tuple[torch.Tensor, ...], x: torch.Tensor, state: tuple[torch.Tensor, ...]):
    """One step: weights from :meth:`RWKVCell.fused`, x (B, H), state 5 x (B, H) -> (out (B, H), state)."""
    g1, b1, g2, b2, u, w, w_tm, w_o, w_cm, w_vc = weights
    sx, aa, bb, pp, sx_cm = state
    H = x.shape[-1]
    xn = F.layer_norm(x, (H,), g1, b1)
    k, v, r = (torch.cat([xn, sx], 1) @ w_tm.t()).split(H, 1)
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = pp + w
    q = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - q), torch.exp(k - q)
    aa, bb = e1 * aa + e2 * v, e1 * bb + e2
    x = x + (torch.sigmoid(r) * wkv) @ w_o.t()
    xn2 = F.layer_norm(x, (H,), g2, b2)
    kc, rc = (torch.cat([xn2, sx_cm], 1) @ w_cm.t()).split([FFN_MULT * H, H], 1)
    out = x + torch.sigmoid(rc) * (torch.relu(kc).square() @ w_vc.t())
    return out, (xn, aa, bb, q, xn2)
