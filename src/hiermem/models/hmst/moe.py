"""The mixture-of-experts FFN: a linear router, top-k routing with renormalised gates, SwiGLU experts
computed grouped by expert, and the router's auxiliary losses.

For tokens x (n, d): router logits r = x W_r^T (n, E), probabilities p = softmax(r); each token goes
to its top-k experts with gates p_top / sum(p_top), and its output is sum_k gate_k * expert_k(x).

- balance (Switch-style): E * sum_e f_e P_e, f_e = share of the n * k assignments that go to
  expert e (no gradient), P_e = mean router probability of e; 1.0 when routing is uniform.
- router_z: mean over tokens of logsumexp(r)^2 (keeps router logits small).

A MoE built with ``expert_bias`` holds a learned per-expert vector b (E,) (zero at initialisation);
with the expert-bias gate open (``bias=True``) it is added first, r = x W_r^T + b, and used for the
top-k, the gates and both losses. Closed, b takes no part (and gets no gradient). A MoE without
it has b = 0: the open gate changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """experts (n, k): chosen experts per token (best first); gates (n, k): their renormalised
    weights; probs, logits (n, E): router probabilities and logits (float32 or wider)."""

    experts: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor

    def balance_loss(self) -> torch.Tensor:
        """num_experts * sum_e f_e * P_e (1.0 for uniform routing)."""
        E = self.probs.shape[-1]
        counts = torch.bincount(self.experts.flatten(), minlength=E).to(self.probs.dtype)
        f = counts / max(self.experts.numel(), 1)
        return E * (f * self.probs.mean(0)).sum()

    def z_loss(self) -> torch.Tensor:
        return torch.logsumexp(self.logits, dim=-1).square().mean()


class MoE(nn.Module):
    """E SwiGLU experts (stacked weights: w_in (E, 2f, d) = [gate; up], w_out (E, d, f)), a router
    and, with ``expert_bias``, the expert-bias gate's router bias ``expert_bias`` (E,) (else None)."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, expert_bias: bool = False):
        super().__init__()
        self.num_experts, self.top_k, self.ffn = num_experts, top_k, ffn
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts)) if expert_bias else None

    def route(self, x: torch.Tensor, bias: bool = False) -> Routing:
        """x (n, d) -> the routing of every token; ``bias``: add ``expert_bias`` (if any) to the router logits."""
        logits = self.router(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if bias and self.expert_bias is not None:
            logits = logits + self.expert_bias.to(logits.dtype)
        probs = logits.softmax(-1)
        top, experts = probs.topk(self.top_k, dim=-1)  # (n, k)
        return Routing(experts, top / top.sum(-1, keepdim=True), probs, logits)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens x (m, d) -> (m, d): one matmul in, SwiGLU, one matmul out."""
        gate, up = F.linear(x, self.w_in[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_out[e])

    def forward(self, x: torch.Tensor, bias: bool = False) -> tuple[torch.Tensor, Routing]:
        """x (B, T, d) -> (y (B, T, d), routing); ``bias``: the expert-bias gate. Tokens are sorted by
        expert and every expert runs once over its group; outputs return to their tokens by index
        (no scatter-add: deterministic)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (n, d)
        routing = self.route(flat, bias)
        assigned = routing.experts.flatten()  # (n k,): assignment j is token j // k
        order = torch.argsort(assigned, stable=True)
        counts = torch.bincount(assigned, minlength=self.num_experts).tolist()
        groups = flat[order // self.top_k].split(counts)  # tokens of each expert, in token order
        out = torch.cat([self.expert(e, g) for e, g in enumerate(groups)])  # (n k, d), sorted by expert
        out = out * routing.gates.flatten()[order, None].to(out.dtype)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        y = unsorted.view(-1, self.top_k, shape[-1]).sum(1)  # (n, d): sum over each token's k experts
        return y.view(shape).to(x.dtype), routing
