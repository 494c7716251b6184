"""The GRU cell of HRMLM: its parameters and initialisation.

A cell's step is ``h' = (1 - z) * n + z * h`` with ``r, z = sigmoid(a_rz + b_rz)`` and
``n = tanh(a_n + r * b_n)``, where ``a`` are the input pre-activations (``W_ih x``) and ``b`` the
recurrent ones (``W_hh h``), three gates (r, z, n) of ``hidden_size`` each. Without layer norm both
carry a bias; with it every gate's ``a`` and ``b`` are layer-normalised with their own gain and
bias (the linear maps then have none). The arithmetic lives in :mod:`hiermem.models.hrmlm.recurrence`,
which computes ``a`` once for many steps; :meth:`GRUCell.forward` is one plain step through it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hiermem.models.hrmlm.recurrence import Norm, gru_update


class GRUCell(nn.Module):
    """GRU cell (optionally layer-normalised): weights ``weight_ih`` (3H, I), ``weight_hh`` (3H, H)
    and per kind ("ih", "hh") either a bias (3H,) or a layer-norm gain and bias (3H,) each."""

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
        bound = math.sqrt(6.0 / (self.input_size + self.hidden_size))
        nn.init.uniform_(self.weight_ih, -bound, bound)
        with torch.no_grad():
            for block in self.weight_hh.view(3, self.hidden_size, self.hidden_size):
                nn.init.orthogonal_(block)

    def norm_params(self, kind: str) -> tuple[torch.Tensor, ...]:
        """(gain, bias) of the "ih" or "hh" layer norm, or (bias,) without layer norm."""
        if self.layer_norm:
            return getattr(self, f"norm_{kind}_weight"), getattr(self, f"norm_{kind}_bias")
        return (getattr(self, f"bias_{kind}"),)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One plain step: x (B, I), h (B, H) -> h' (B, H)."""
        a = Norm(self.hidden_size, self.norm_params("ih"), save=False)(x @ self.weight_ih.t())
        b = Norm(self.hidden_size, self.norm_params("hh"), save=False)(h @ self.weight_hh.t())
        return gru_update(a, b, h)[0]
