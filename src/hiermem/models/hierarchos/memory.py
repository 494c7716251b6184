"""The Titans-style long-term memory (LTM) of Hierarchos: learned keys, learned slow values plus
per-row fast values that are updated at run time by surprise, with momentum and forgetting.

Memory of a row after token t: M_t = V_slow + F_t (S, V_dim). Per token (query q, B x K_dim):

    read:    idx = top-k of q K^T / sqrt(K_dim);  a = softmax of those scores;  m_j = M_{t-1}[idx_j]
    surprise: the associative loss l = 1/2 ||r - v||^2 of the read r = sum_j a_j m_j against the value
             v the token stores; its gradient w.r.t. the read slots is g_j = a_j (r - v) (closed form:
             no autograd, so generation under no_grad still learns)
    update (every slot s, g = 0 on slots not read):
             mom_t = clamp(beta * mom_{t-1} + g, +-2.5 c)
             F_t   = clamp(rho * F_{t-1} - lr * [s read] * mom_t, +-c)      rho = 1 - ltm_forget

Stored lazily: only the k slots read change, each with the time of its last write. A slot last
written at time tau holds (F_s, mom_s); at time t its values are rho^(t-tau) F_s and
beta^(t-tau) mom_s (decay alone never leaves the clamp range), which is exactly the dense rule above
at O(k V) per token instead of O(S V). ``dense`` gives the dense view for inspection and tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MOMENTUM_CLAMP = 2.5  # x ltm_clamp (the seed bounds values at 20, momentum at 50)


class LongTermMemory(nn.Module):
    """Keys (S, K_dim), slow values (S, V_dim), the read gate and the age encoding."""

    def __init__(self, slots: int, key_dim: int, val_dim: int, topk: int):
        super().__init__()
        self.topk, self.val_dim = topk, val_dim
        self.keys = nn.Parameter(torch.randn(slots, key_dim) * 0.02)
        vals = torch.empty(slots, val_dim)
        nn.init.orthogonal_(vals)
        self.vals = nn.Parameter(vals * 0.02)
        self.gate_logit = nn.Parameter(torch.tensor(-2.0))
        half = val_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
        self.register_buffer("time_freqs", freqs.float(), persistent=False)

    def age_encoding(self, age: torch.Tensor, dtype) -> torch.Tensor:
        """Sinusoidal encoding (..., V_dim) of slot ages (...) (tokens since the slot's last write)."""
        args = age.to(torch.float64)[..., None] * self.time_freqs.to(torch.float64)
        pe = torch.cat([torch.sin(args), torch.cos(args)], -1)
        if pe.shape[-1] < self.val_dim:
            pe = torch.cat([pe, pe.new_zeros(*pe.shape[:-1], 1)], -1)
        return pe.to(dtype)

    def read(self, q: torch.Tensor, fast: torch.Tensor, stamp: torch.Tensor, now: torch.Tensor, rho: float):
        """Top-k read of M_{t-1} for queries q (B, K_dim).

        fast (B, S, V), stamp (B, S) (time of each slot's last write, -1 = never), now (B,) the
        current time. Returns idx (B, k), a (B, k), age (B, k), m (B, k, V) (the slots' values)
        and the encoder's view gate * (a_j m_j + age_encoding) (B, k, V).
        """
        sim = (q @ self.keys.t()) * self.keys.shape[1] ** -0.5  # (B, S)
        top, idx = sim.topk(self.topk, dim=-1)
        a = torch.softmax(top, -1)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        age = now[:, None] - stamp[rows, idx]  # (B, k) >= 1
        decay = torch.pow(rho, (age - 1).to(torch.float64)).to(fast.dtype)
        m = self.vals[idx] + fast[rows, idx] * decay[..., None]
        view = torch.sigmoid(self.gate_logit) * (a[..., None] * m + self.age_encoding(age, m.dtype))
        return idx, a, age, m, view

    @staticmethod
    def write(fast, mom, stamp, idx, a, age, m, v, now, lr: float, beta: float, rho: float, clamp: float):
        """The surprise update, in place on fast, mom (B, S, V) and stamp (B, S) (clones owned by
        the caller) for the slots idx (B, k) read at time now (B,) with a, age, m of :meth:`read`
        and the stored value v (B, V). Returns the read r (B, V)."""
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        r = (a[..., None] * m).sum(1)
        g = a[..., None] * (r - v)[:, None]  # d(1/2 ||r - v||^2) / d m_j
        age64 = age.to(torch.float64)[..., None]
        mom_new = (torch.pow(beta, age64).to(m.dtype) * mom[rows, idx] + g).clamp(-MOMENTUM_CLAMP * clamp,
                                                                                 MOMENTUM_CLAMP * clamp)
        fast_new = (torch.pow(rho, age64).to(m.dtype) * fast[rows, idx] - lr * mom_new).clamp(-clamp, clamp)
        fast[rows, idx] = fast_new
        mom[rows, idx] = mom_new
        stamp[rows, idx] = now[:, None]
        return r

    @staticmethod
    def dense(fast, mom, stamp, now, beta: float, rho: float):
        """The fast values and momentum (B, S, V) of every slot after time ``now`` (B,) - 1."""
        age = (now[:, None] - 1 - stamp).to(torch.float64)[..., None]  # stamp -1: never written (zeros)
        return fast * torch.pow(rho, age).to(fast.dtype), mom * torch.pow(beta, age).to(mom.dtype)
