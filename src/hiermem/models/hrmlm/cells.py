"""The GRU cell of HRMLM, written so that the model can split its work across time.

A cell's step is ``h' = (1 - z) * n + z * h`` with ``r, z = sigmoid(a_rz + b_rz)`` and
``n = tanh(a_n + r * b_n)``, where ``a`` are the input pre-activations (``W_ih x``) and ``b`` the
recurrent ones (``W_hh h``), three gates (r, z, n) of ``hidden_size`` each. Without layer norm both
carry a bias; with it every gate's ``a`` and ``b`` are layer-normalised with their own gain and
bias (the linear maps then have none). The model computes ``a`` once for many steps (all tokens at
once for the embedding part, once per high-level cycle for the rest), so the cell exposes the
pieces: :meth:`input_gates`, :meth:`hidden_gates` and :meth:`update`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GRUCell(nn.Module):
    """GRU cell (optionally layer-normalised) split into input gates, hidden gates and update."""

    def __init__(self, input_size: int, hidden_size: int, layer_norm: bool = True):
        super().__init__()
        self.input_size, self.hidden_size, self.layer_norm = input_size, hidden_size, layer_norm
        H3 = 3 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(H3, input_size))
        self.weight_hh = nn.Parameter(torch.empty(H3, hidden_size))
        if layer_norm:  # gains/biases as flat (3H,) vectors: no weight decay, viewed (3, H) per gate
            self.norm_ih_weight = nn.Parameter(torch.ones(H3))
            self.norm_ih_bias = nn.Parameter(torch.zeros(H3))
            self.norm_hh_weight = nn.Parameter(torch.ones(H3))
            self.norm_hh_bias = nn.Parameter(torch.zeros(H3))
        else:
            self.bias_ih = nn.Parameter(torch.zeros(H3))
            self.bias_hh = nn.Parameter(torch.zeros(H3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform input weights, orthogonal recurrent blocks (one per gate); norms and biases
        keep their identity / zero initialisation."""
        nn.init.uniform_(self.weight_ih, -math.sqrt(6.0 / (self.input_size + self.hidden_size)),
                         math.sqrt(6.0 / (self.input_size + self.hidden_size)))
        with torch.no_grad():
            for block in self.weight_hh.view(3, self.hidden_size, self.hidden_size):
                nn.init.orthogonal_(block)

    def _norm(self, pre: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Layer norm of each gate of pre (..., 3H) with its own gain and bias."""
        shape = pre.shape
        x = F.layer_norm(pre.view(*shape[:-1], 3, self.hidden_size), (self.hidden_size,))
        return torch.addcmul(bias.view(3, -1), x, gain.view(3, -1)).view(shape)

    def input_gates(self, pre: torch.Tensor) -> torch.Tensor:
        """``a`` from the input product ``W_ih x`` (..., 3H) (bias or per-gate layer norm added)."""
        if self.layer_norm:
            return self._norm(pre, self.norm_ih_weight, self.norm_ih_bias)
        return pre + self.bias_ih

    def hidden_gates(self, h: torch.Tensor | None = None, pre: torch.Tensor | None = None) -> torch.Tensor:
        """``b`` from the state h (B, H), or from a precomputed product ``pre = W_hh h`` (B, 3H)."""
        if pre is None:
            if not self.layer_norm:
                return torch.addmm(self.bias_hh, h, self.weight_hh.t())
            pre = h @ self.weight_hh.t()
        if self.layer_norm:
            return self._norm(pre, self.norm_hh_weight, self.norm_hh_bias)
        return pre + self.bias_hh

    @staticmethod
    def update(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The new state from gates a, b (B, 3H) and the state h (B, H)."""
        H = h.shape[-1]
        rz = torch.sigmoid(a[:, :2 * H] + b[:, :2 * H])
        n = torch.tanh(torch.addcmul(a[:, 2 * H:], rz[:, :H], b[:, 2 * H:]))
        return torch.lerp(n, h, rz[:, H:])  # n + z * (h - n) = (1 - z) * n + z * h

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One plain step: x (B, I), h (B, H) -> h' (B, H)."""
        return self.update(self.input_gates(x @ self.weight_ih.t()), self.hidden_gates(h), h)
