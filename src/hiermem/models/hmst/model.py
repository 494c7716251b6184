"""HMST: a pre-norm decoder whose layers are windowed causal attention, an episodic SSM (in every
``ssm_every``-th layer) and a mixture-of-experts FFN::

    h = h + Attention_W(RMSNorm(h))      each token sees itself and the W - 1 tokens before it (RoPE)
    h = h + SSM(RMSNorm(h))              (SSM layers) the selective state space over everything read
    h = h + MoE(RMSNorm(h))              top-k of E SwiGLU experts

The state is the last W - 1 keys and values of every layer plus every SSM layer's convolution and
scan state, so reading any length takes constant memory, and calls carrying the state compose:
chunked calls equal one long call, and the default decoder (one call per token) is exact.
Attention runs in blocks of queries, each over its own W - 1 + block keys with positions counted
from the block's first key (RoPE is relative), so a long input costs O(T W) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.models.base import Decoder, HiermemModel, ModelOutput, lm_output
from hiermem.models.hmst.config import HMSTConfig
from hiermem.models.hmst.moe import MoE
from hiermem.models.hmst.ssm import EpisodicSSM
from hiermem.models.state import ModelState, batch_field


@dataclass
class HMSTState(ModelState):
    """keys, values: (B, layers, kv_heads, W - 1, head_dim) the window's keys (before rotation) and
    values, right-aligned; filled (B,): how many of those W - 1 slots hold tokens of this row;
    conv: (B, ssm layers, K - 1, C) last convolution inputs; ssm: (B, ssm layers, H, P, N) scan states;
    tokens: tokens read so far."""

    KIND: ClassVar[str] = "hmst-state"
    keys: torch.Tensor = batch_field(0)
    values: torch.Tensor = batch_field(0)
    filled: torch.Tensor = batch_field(0)
    conv: torch.Tensor = batch_field(0)
    ssm: torch.Tensor = batch_field(0)
    tokens: int = 0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., n, hd) by position tables cos, sin (n, hd) (Llama's rotate-half layout)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class WindowAttention(nn.Module):
    """Causal self-attention over a sliding window of W tokens, with grouped-query heads."""

    def __init__(self, c: HMSTConfig):
        super().__init__()
        self.c, self.H, self.G, self.hd, self.W = c, c.num_heads, c.kv_heads, c.head_dim, c.attention_window
        self.q_proj = nn.Linear(c.hidden_size, self.H * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.G * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.G * self.hd, bias=False)
        self.o_proj = nn.Linear(self.H * self.hd, c.hidden_size, bias=False)

    def tables(self, n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin (n, hd) for positions 0..n-1."""
        work = torch.promote_types(dtype, torch.float32)
        inv = self.c.rope_theta ** -(torch.arange(0, self.hd, 2, device=device, dtype=work) / self.hd)
        ang = torch.arange(n, device=device, dtype=work)[:, None] * inv
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor):
        """x (B, T, d); keys, values (B, G, W - 1, hd); filled (B,) -> (y (B, T, d), keys, values)."""
        B, T, _ = x.shape
        W, hist = self.W, self.W - 1
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = torch.cat([keys.to(q.dtype), self.k_proj(x).view(B, T, self.G, self.hd).transpose(1, 2)], 2)
        v = torch.cat([values.to(q.dtype), self.v_proj(x).view(B, T, self.G, self.hd).transpose(1, 2)], 2)
        block = min(T, max(W, 128))  # queries per block; the block reads block + W - 1 keys
        cos, sin = self.tables(block + hist, x.device, q.dtype)
        first_valid = (hist - filled.to(x.device))[:, None, None, None]  # (B, 1, 1, 1): first real slot
        outs = []
        for i0 in range(0, T, block):
            n = min(block, T - i0)
            # query i (input index) sits at key index hist + i and sees keys i .. hist + i
            qi = rope(q[:, :, i0:i0 + n], cos[hist:hist + n], sin[hist:hist + n])
            ki = rope(k[:, :, i0:i0 + n + hist], cos[:n + hist], sin[:n + hist])
            vi = v[:, :, i0:i0 + n + hist]
            rows = torch.arange(n, device=x.device)[:, None]
            cols = torch.arange(n + hist, device=x.device)[None, :]
            mask = (cols >= rows) & (cols <= rows + hist) & (cols + i0 >= first_valid)  # (B, 1, n, n + hist)
            if self.G != self.H:
                ki, vi = (t.repeat_interleave(self.H // self.G, dim=1) for t in (ki, vi))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask,
                                                       dropout_p=self.c.dropout if self.training else 0.0))
        y = torch.cat(outs, 2).transpose(1, 2).reshape(B, T, self.H * self.hd)
        return self.o_proj(y), k[:, :, k.shape[2] - hist:].to(keys.dtype), v[:, :, v.shape[2] - hist:].to(keys.dtype)


class HMSTLayer(nn.Module):
    def __init__(self, c: HMSTConfig, has_ssm: bool):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.hidden_size), WindowAttention(c)
        self.ssm_norm = RMSNorm(c.hidden_size) if has_ssm else None
        self.ssm = EpisodicSSM(c) if has_ssm else None
        self.moe_norm, self.moe = RMSNorm(c.hidden_size), MoE(c.hidden_size, c.ffn_size, c.num_experts, c.top_k)


class HMST(HiermemModel):
    """HMST decoder trained from scratch (see the module docstring). Auxiliary losses in
    ``ModelOutput.aux``: "balance" and "router_z" (means over layers), weighted by ``aux_weights``."""

    config_class: ClassVar[type] = HMSTConfig
    state_class: ClassVar[type] = HMSTState
    decoder_class: ClassVar[type] = Decoder  # calls compose: the default decoder is exact
    default_trainable: ClassVar[str] = "full"

    def __init__(self, config: HMSTConfig):
        super().__init__()
        self.config = c = config
        ssm = set(c.ssm_layers)
        self.embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(HMSTLayer(c, i in ssm) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size)
        self.head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices; projections into the residual stream scaled by 1/sqrt(2 layers)."""
        std = self.config.init_std
        out_std = std / (2 * self.config.num_layers) ** 0.5
        nn.init.normal_(self.embedding.weight, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)
        for layer in self.layers:
            a, m = layer.attn, layer.moe
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.router):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(a.o_proj.weight, std=out_std)
            nn.init.normal_(m.w_in, std=std)
            nn.init.normal_(m.w_out, std=out_std)
            if layer.ssm is not None:
                layer.ssm.reset_parameters(std, out_std)

    # --- protocol ---------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> HMSTState:
        c, p = self.config, self.embedding.weight
        S = len(c.ssm_layers)
        kv = p.new_zeros(batch_size, c.num_layers, c.kv_heads, c.attention_window - 1, c.head_dim)
        return HMSTState(keys=kv, values=kv.clone(),
                         filled=torch.zeros(batch_size, dtype=torch.long, device=p.device),
                         conv=p.new_zeros(batch_size, S, c.ssm_conv - 1, c.ssm_conv_channels),
                         ssm=p.new_zeros(batch_size, S, c.ssm_heads, c.ssm_head_dim, c.ssm_state_size))

    def architecture_fields(self) -> tuple[str, ...]:
        training_only = ("dropout", "init_std", "tokenizer", "balance_loss_weight", "router_z_loss_weight",
                         "ssm_chunk")
        return tuple(k for k in self.config.to_dict() if k not in training_only)

    @property
    def aux_weights(self) -> dict[str, float]:
        return {"balance": float(self.config.balance_loss_weight), "router_z": float(self.config.router_z_loss_weight)}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) from final hidden states (..., d)."""
        return self.head(h) if self.head is not None else F.linear(h, self.embedding.weight)

    def forward(self, input_ids: torch.Tensor, state: HMSTState | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True, return_token_nll: bool = False, return_hidden: bool = False) -> ModelOutput:
        """Read input_ids (B, T) after ``state`` (empty when None).

        labels (B, T): HF convention (shifted inside, -100 ignored). Without return_logits, labels
        and token NLL only the last position's logits are made (generation, reading).
        return_hidden: also return the final (normed) hidden states (B, T, d) as ``out.hidden``.
        """
        state = self.checked_state(input_ids, state, labels)
        B, T = input_ids.shape
        h = self.embedding(input_ids)
        keys, values, convs, ssms, balance, z = [], [], [], [], [], []
        for i, layer in enumerate(self.layers):
            y, k, v = layer.attn(layer.attn_norm(h), state.keys[:, i], state.values[:, i], state.filled)
            h = h + y
            keys.append(k), values.append(v)
            if layer.ssm is not None:
                j = len(ssms)
                y, conv, ssm = layer.ssm(layer.ssm_norm(h), state.conv[:, j], state.ssm[:, j])
                h = h + y
                convs.append(conv), ssms.append(ssm)
            y, routing = layer.moe(layer.moe_norm(h))
            h = h + y
            balance.append(routing.balance_loss()), z.append(routing.z_loss())
        h = self.norm(h)
        new_state = HMSTState(
            keys=torch.stack(keys, 1), values=torch.stack(values, 1),
            filled=(state.filled + T).clamp(max=self.config.attention_window - 1),
            conv=torch.stack(convs, 1) if convs else state.conv, ssm=torch.stack(ssms, 1) if ssms else state.ssm,
            tokens=state.tokens + T)
        aux = {"balance": torch.stack(balance).mean(), "router_z": torch.stack(z).mean()}
        if return_logits or labels is not None or return_token_nll:
            out = lm_output(self.logits(h), input_ids, labels, new_state, return_logits, return_token_nll, aux)
        else:
            out = ModelOutput(loss=None, state=new_state, aux=aux, last_logits=self.logits(h[:, -1]))
        out.hidden = h if return_hidden else None
        return out
