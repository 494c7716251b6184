"""The episodic memory: a selective state-space layer (Mamba-style) and its chunked parallel scan.

Per head h (P channels) and token t, with input-dependent step Δ_t,h > 0, B_t, C_t in R^N and a
decay A_h < 0 (A is diagonal with one value per head, Mamba-2's structure)::

    S_t = exp(Δ_t,h A_h) S_{t-1} + (Δ_t,h x_t,h) B_t^T        S: (P, N) per head
    y_t,h = S_t C_t + D_h x_t,h

The state S carries everything read so far in constant memory (the attention window holds the
last W tokens; S holds what came before). :func:`chunked_scan` computes the same values without a
per-token loop: within a chunk of L tokens, with c_t the cumulative log-decay,

    y_t = sum_{s<=t} exp(c_t - c_s) (C_t . B_s) u_s + exp(c_t) S_in C_t        (matmuls; exponents <= 0)

and across chunks only the (P, N) state is carried. Equal to the sequential loop in float64 (values
and gradients, tests/hmst_reference.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def chunked_scan(u: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: torch.Tensor,
                 chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence S_t = exp(log_a_t) S_{t-1} + u_t b_t^T, y_t = S_t c_t, in parallel over chunks.

    u (B, T, H, P): inputs (Δ x); log_a (B, T, H) <= 0: log decays (Δ A); b, c (B, T, N);
    state (B, H, P, N): S before the first token. Returns y (B, T, H, P) and S after the last token.
    """
    Bsz, T, H, P = u.shape
    L = max(1, min(chunk, T))
    pad = -T % L
    if pad:  # padded steps decay by exp(0) = 1 and add nothing: the final state is unchanged
        u, log_a = F.pad(u, (0, 0, 0, 0, 0, pad)), F.pad(log_a, (0, 0, 0, pad))
        b, c = F.pad(b, (0, 0, 0, pad)), F.pad(c, (0, 0, 0, pad))
    n = (T + pad) // L
    uc = u.view(Bsz, n, L, H, P).transpose(2, 3)  # (B, n, H, L, P)
    cum = torch.cumsum(log_a.view(Bsz, n, L, H).transpose(2, 3), -1)  # (B, n, H, L): c_t within the chunk
    bc, cc = b.view(Bsz, n, L, -1), c.view(Bsz, n, L, -1)  # (B, n, L, N)
    causal = torch.ones(L, L, dtype=torch.bool, device=u.device).tril()
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf))  # (B, n, H, L, L)
    y = ((cc @ bc.transpose(-1, -2))[:, :, None] * decay) @ uc  # (B, n, H, L, P): within the chunk
    to_end = torch.exp(cum[..., -1:] - cum)  # (B, n, H, L): decay from each token to the chunk's end
    adds = (uc * to_end[..., None]).transpose(-1, -2) @ bc[:, :, None]  # (B, n, H, P, N): each chunk's input
    totals = torch.exp(cum[..., -1])  # (B, n, H): each chunk's whole decay
    entering = []
    for i in range(n):  # carry the state across chunks
        entering.append(state)
        state = totals[:, i, :, None, None] * state + adds[:, i]
    s_in = torch.stack(entering, 1)  # (B, n, H, P, N)
    y = y + (cc[:, :, None] @ s_in.transpose(-1, -2)) * torch.exp(cum)[..., None]
    return y.transpose(2, 3).reshape(Bsz, n * L, H, P)[:, :T], state


class EpisodicSSM(nn.Module):
    """Mamba-style selective SSM block: in-projection to (z, x, B, C, Δ), causal depthwise
    convolution over (x, B, C), SiLU, the scan, y * SiLU(z), out-projection.

    State per row: conv (K - 1, C) (the last convolution inputs) and ssm (H, P, N).
    """

    def __init__(self, config):
        super().__init__()
        self.c = c = config
        self.inner, self.N, self.H, self.P = c.ssm_inner, c.ssm_state_size, c.ssm_heads, c.ssm_head_dim
        channels = c.ssm_conv_channels
        self.in_proj = nn.Linear(c.hidden_size, 2 * self.inner + 2 * self.N + self.H, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(channels, c.ssm_conv))
        self.conv_bias = nn.Parameter(torch.zeros(channels))
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        self.out_proj = nn.Linear(self.inner, c.hidden_size, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Mamba's initialisation: decays A in [1, 16], steps Δ log-uniform in [1e-3, 0.1]."""
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(self.c.ssm_conv), 1 / math.sqrt(self.c.ssm_conv))
        nn.init.zeros_(self.conv_bias)
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.empty(self.H).uniform_(1.0, 16.0)))
            dt = torch.exp(torch.empty(self.H).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.ones_(self.D)

    def forward(self, x: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor):
        """x (B, T, d); conv (B, K - 1, C); ssm (B, H, P, N) -> (y (B, T, d), new conv, new ssm)."""
        Bsz, T, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.c.ssm_conv_channels, self.H], dim=-1)
        seq = torch.cat([conv.to(xbc.dtype), xbc], dim=1)  # (B, K - 1 + T, C)
        new_conv = seq[:, seq.shape[1] - conv.shape[1]:].to(conv.dtype)
        xbc = F.conv1d(seq.transpose(1, 2), self.conv_weight[:, None].to(xbc.dtype), self.conv_bias.to(xbc.dtype),
                       groups=seq.shape[-1]).transpose(1, 2)  # (B, T, C)
        xs, b, c = F.silu(xbc).split([self.inner, self.N, self.N], dim=-1)
        work = torch.promote_types(x.dtype, torch.float32)  # the scan runs in float32 at least
        with torch.autocast(x.device.type, enabled=False):
            step = F.softplus(dt.to(work) + self.dt_bias.to(work))  # (B, T, H)
            log_a = -step * torch.exp(self.A_log.to(work))
            xh = xs.to(work).view(Bsz, T, self.H, self.P)
            y, new_ssm = chunked_scan(xh * step[..., None], log_a, b.to(work), c.to(work), ssm.to(work),
                                      self.c.ssm_chunk)
            y = y + self.D.to(work)[:, None] * xh
        y = y.reshape(Bsz, T, self.inner).to(z.dtype) * F.silu(z)
        return self.out_proj(y), new_conv, new_ssm.to(ssm.dtype)
