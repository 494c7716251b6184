"""The HMST meta-controller: a small transformer encoder that reads a short sequence of per-step
feature vectors and emits five Bernoulli gates (early exit, episodic access, semantic retrieval,
expert bias, verification) plus a value estimate for PPO.

It knows nothing of the decoder: `step_features` turns whatever the decoder exposes (a pooled hidden
state, next-token logits, the position, the memory fill) into one feature vector, and the caller
stacks the last few into the (B, T, F) input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import ConfigError
from hiermem.io import check_ints

GATES = ("early_exit", "episodic", "semantic", "expert_bias", "verify")
NUM_STATS = 3  # token entropy, relative position, memory fill


@dataclass
class ControllerConfig:
    """feature_dim: F, size of one step's feature vector (e.g. hidden_size + NUM_STATS).
    d_model, num_layers, num_heads, ffn_mult: the encoder's width, depth, heads, FFN width factor.
    max_steps: the longest feature sequence T (learned position embeddings).
    """

    feature_dim: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_mult: int = 2
    max_steps: int = 16

    def __post_init__(self):
        check_ints(self, ("feature_dim", "d_model", "num_layers", "num_heads", "ffn_mult", "max_steps"),
                   what="controller ")
        if self.d_model % self.num_heads:
            raise ConfigError(f"controller d_model {self.d_model} is not divisible by num_heads {self.num_heads}")


@dataclass
class GateDecision:
    """One sampled (or greedy) decision per batch row. actions: (B, 5) float in {0, 1}, columns in
    GATES order; log_prob: (B,) summed over the gates; value: (B,)."""

    actions: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor

    def gates(self) -> dict[str, torch.Tensor]:
        """Gate name -> (B,) bool."""
        return {name: self.actions[:, i] > 0.5 for i, name in enumerate(GATES)}


def step_features(hidden: torch.Tensor, logits: torch.Tensor, position: torch.Tensor | int, max_position: int,
                  memory_fill: torch.Tensor | float) -> torch.Tensor:
    """One step's controller features: hidden (B, H) pooled decoder state, logits (B, V) next-token
    logits, position (B,) or int, memory_fill (B,) or float in [0, 1] -> (B, H + NUM_STATS): the hidden
    state, the next-token entropy / log V, position / max_position (clamped to 1), the memory fill."""
    B = hidden.shape[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    pos = torch.as_tensor(position, dtype=torch.float32, device=hidden.device).expand(B)
    fill = torch.as_tensor(memory_fill, dtype=torch.float32, device=hidden.device).expand(B)
    stats = torch.stack([entropy, (pos / max_position).clamp(max=1.0), fill.clamp(0.0, 1.0)], dim=-1)
    return torch.cat([hidden.float(), stats], dim=-1)


class MetaController(nn.Module):
    """Features (B, T, F) (or (B, F), read as T = 1) -> gate logits (B, 5) and value (B,).

    A learned summary token is prepended to the projected features; the pre-norm encoder's output at
    that token feeds the gate and value heads. mask (B, T) bool marks real steps (None = all real).
    """

    def __init__(self, config: ControllerConfig):
        super().__init__()
        self.config = c = config
        self.proj = nn.Linear(c.feature_dim, c.d_model)
        self.summary = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos = nn.Parameter(torch.randn(1, c.max_steps + 1, c.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(c.d_model, c.num_heads, c.ffn_mult * c.d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.gate_head = nn.Linear(c.d_model, len(GATES))
        self.value_head = nn.Linear(c.d_model, 1)
        nn.init.zeros_(self.gate_head.weight)  # start at p = 0.5 for every gate: maximal exploration
        nn.init.zeros_(self.gate_head.bias)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() == 2:
            features = features[:, None]
            mask = None if mask is None else mask[:, None]
        B, T, Fd = features.shape
        if Fd != self.config.feature_dim:
            raise ConfigError(f"controller expects {self.config.feature_dim} features per step, got {Fd}")
        if T > self.config.max_steps:
            raise ConfigError(f"controller reads at most {self.config.max_steps} steps, got {T}")
        x = torch.cat([self.summary.expand(B, 1, -1), self.proj(features)], dim=1) + self.pos[:, : T + 1]
        pad = None
        if mask is not None:  # key padding: True = ignore; the summary token is always real
            pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=mask.device), ~mask.bool()], dim=1)
        h = self.norm(self.encoder(x, src_key_padding_mask=pad)[:, 0])  # (B, d_model)
        return self.gate_head(h), self.value_head(h).squeeze(-1)

    @staticmethod
    def _log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Sum over gates of log Bernoulli(actions | sigmoid(logits)): (B, 5), (B, 5) -> (B,)."""
        return -F.binary_cross_entropy_with_logits(logits, actions, reduction="none").sum(-1)

    @staticmethod
    def _entropy(logits: torch.Tensor) -> torch.Tensor:
        """Sum over gates of the Bernoulli entropy: (B, 5) -> (B,)."""
        p = torch.sigmoid(logits)
        return F.binary_cross_entropy_with_logits(logits, p, reduction="none").sum(-1)

    @torch.no_grad()
    def act(self, features: torch.Tensor, generator: torch.Generator | None = None,
            mask: torch.Tensor | None = None) -> GateDecision:
        """Sample every gate from its Bernoulli (reproducibly with ``generator``)."""
        logits, value = self(features, mask)
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        actions = (u < torch.sigmoid(logits)).to(logits.dtype)
        return GateDecision(actions, self._log_prob(logits, actions), value)

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> GateDecision:
        """Open exactly the gates with p > 0.5."""
        logits, value = self(features, mask)
        actions = (logits > 0).to(logits.dtype)
        return GateDecision(actions, self._log_prob(logits, actions), value)

    def evaluate(self, features: torch.Tensor, actions: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log_prob (B,), entropy (B,), value (B,)) of ``actions`` (B, 5) under the current policy,
        with gradients (the PPO update)."""
        logits, value = self(features, mask)
        return self._log_prob(logits, actions.to(logits.dtype)), self._entropy(logits), value
