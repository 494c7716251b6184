"""Cross-attention memory recall (HMT's memory search) and memory-embedding projections."""

from __future__ import annotations

import math

import torch
from torch import nn

from hiermem.errors import ConfigError


class CrossAttentionRecall(nn.Module):
    """P = softmax((S Wq)(M Wk)^T / sqrt(h)) M  — one query attends over the bank.

    Wq, Wk: d -> h without bias; values are the raw memory embeddings (as in the paper).
    """

    def __init__(self, dim: int, recall_dim: int):
        super().__init__()
        self.recall_dim = recall_dim
        self.query = nn.Linear(dim, recall_dim, bias=False)
        self.key = nn.Linear(dim, recall_dim, bias=False)

    def forward(self, summary: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """summary (B, 1, d), bank (B, n, d) -> recalled (B, 1, d), weights (B, n)."""
        q = self.query(summary)  # (B, 1, h)
        k = self.key(bank)  # (B, n, h)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.recall_dim)  # (B, 1, n)
        # at least float32 for the softmax (half-precision banks), float64 kept in float64
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(bank.dtype)
        return weights @ bank, weights.squeeze(1)  # (B, 1, d), (B, n)


class RMSProjection(nn.Module):
    """Rescale a post-final-norm hidden state to the RMS of the input embeddings (learned gain)."""

    def __init__(self, dim: int, target_rms: float):
        super().__init__()
        self.gain = nn.Parameter(torch.full((dim,), float(target_rms)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rms = h.float().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        return (h.float() * rms).to(h.dtype) * self.gain


class LinearProjection(nn.Module):
    """Learned d -> d map initialised to the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.linear.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


def make_projection(kind: str, dim: int, target_rms: float) -> nn.Module:
    """How a last-layer hidden state becomes a memory embedding fed back as an input embedding."""
    if kind == "none":
        return nn.Identity()
    if kind == "rmsnorm":
        return RMSProjection(dim, target_rms)
    if kind == "linear":
        return LinearProjection(dim)
    raise ConfigError(f"unknown memory_projection {kind!r}; choose 'none', 'rmsnorm' or 'linear'")
