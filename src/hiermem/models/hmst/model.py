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

Three compute gates of the meta-controller act per call (``forward``'s ``skip_ssm``, ``exit_layer``,
``expert_bias``); each keeps the state well-defined, so gated calls compose like ungated ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import ConfigError
from hiermem.io import load_tensors
from hiermem.models.base import (WEIGHTS_NAME, Decoder, HiermemModel, ModelOutput, copy_checked, lm_output,
                                  next_token_nll)
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

    def extend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """x (B, T, d); keys, values (B, G, W - 1, hd) -> the window followed by x's keys and values
        (B, G, W - 1 + T, hd) each."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.G, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.G, self.hd).transpose(1, 2)
        return torch.cat([keys.to(k.dtype), k], 2), torch.cat([values.to(v.dtype), v], 2)

    def write(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """The window after x (B, T, d) without attending (a layer skipped by an early exit) -> keys, values."""
        k, v = self.extend(x, keys, values)
        hist = self.W - 1
        return k[:, :, k.shape[2] - hist:].to(keys.dtype), v[:, :, v.shape[2] - hist:].to(keys.dtype)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor):
        """x (B, T, d); keys, values (B, G, W - 1, hd); filled (B,) -> (y (B, T, d), keys, values)."""
        B, T, _ = x.shape
        W, hist = self.W, self.W - 1
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.extend(x, keys, values)  # (B, G, W - 1 + T, hd)
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
        self.moe_norm = RMSNorm(c.hidden_size)
        self.moe = MoE(c.hidden_size, c.ffn_size, c.num_experts, c.top_k, c.expert_bias)


class HMST(HiermemModel):
    """HMST decoder trained from scratch (see the module docstring). Auxiliary losses in
    ``ModelOutput.aux``: "balance" and "router_z" (means over the layers run) and, with
    early_exit_loss_weight > 0 and labels, "early_exit"; weighted by ``aux_weights``."""

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
            if m.expert_bias is not None:
                nn.init.zeros_(m.expert_bias)
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
        # also left out: fields that change neither the state's shape nor its meaning, so that states
        # saved before they existed still load
        training_only = ("dropout", "init_std", "tokenizer", "balance_loss_weight", "router_z_loss_weight",
                         "ssm_chunk", "ssm_drop", "early_exit_layer", "early_exit_loss_weight", "expert_bias")
        return tuple(k for k in self.config.to_dict() if k not in training_only)

    @property
    def aux_weights(self) -> dict[str, float]:
        c = self.config
        weights = {"balance": float(c.balance_loss_weight), "router_z": float(c.router_z_loss_weight)}
        return {**weights, "early_exit": float(c.early_exit_loss_weight)} if c.early_exit_loss_weight > 0 else weights

    def load_weights(self, folder: str | Path, strict: bool = True) -> None:
        """Load ``model.safetensors`` of ``folder``; checkpoints from before the expert-bias gate (no
        ``expert_bias`` tensors) load with zero biases, which leave every output unchanged."""
        tensors, _ = load_tensors(Path(folder) / WEIGHTS_NAME, self.device)
        own = self.state_dict()
        for name in own:
            if name.endswith(".moe.expert_bias") and name not in tensors:
                tensors[name] = torch.zeros_like(own[name])
        copy_checked(own, tensors, folder, type(self).__name__, required=None if strict else ())

    def checked_exit(self, exit_layer: int | None) -> int:
        """The number of layers a call with ``exit_layer`` runs; ConfigError when out of range."""
        L = self.config.num_layers
        if exit_layer is None:
            return L
        if not isinstance(exit_layer, int) or isinstance(exit_layer, bool) or not 1 <= exit_layer <= L:
            raise ConfigError(f"exit_layer must be None or an integer in [1, num_layers={L}] (the layers to run), "
                              f"got {exit_layer!r}")
        return exit_layer

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) from final hidden states (..., d)."""
        return self.head(h) if self.head is not None else F.linear(h, self.embedding.weight)

    def forward(self, input_ids: torch.Tensor, state: HMSTState | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True, return_token_nll: bool = False, return_hidden: bool = False,
                skip_ssm: bool = False, exit_layer: int | None = None, expert_bias: bool = False) -> ModelOutput:
        """Read input_ids (B, T) after ``state`` (empty when None).

        labels (B, T): HF convention (shifted inside, -100 ignored). Without return_logits, labels
        and token NLL only the last position's logits are made (generation, reading).
        return_hidden: also return the final (normed) hidden states (B, T, d) as ``out.hidden``.

        Gates (the defaults run the whole model):
        skip_ssm: episodic access closed: the SSM blocks do not run (the residual passes them) and
            their states come back unchanged. In training, each call closes it with probability ssm_drop.
        exit_layer: k in [1, num_layers]: only layers 0..k-1 run and the final norm and head read the
            hidden state h_k after them; each later layer's window receives keys and values projected
            from h_k by its own attn_norm, k_proj, v_proj, and its SSM state is unchanged.
        expert_bias: every MoE adds its learned ``expert_bias`` to its router logits (a model built
            without them, config expert_bias=false, has zero biases: nothing changes).

        ``out.compute``: what the call spent: "layers" and "ssm_blocks" run, "experts_per_token"
        and "flops_per_token" (multiply-adds per token, :meth:`HMSTConfig.macs_per_token`).
        """
        c = self.config
        state = self.checked_state(input_ids, state, labels)
        run = self.checked_exit(exit_layer)
        if self.training and c.ssm_drop > 0 and not skip_ssm:
            skip_ssm = bool(torch.rand(()) < c.ssm_drop)  # the global RNG: reproducible under the trainer's seed
        early = (c.early_exit_loss_weight > 0 and labels is not None and c.early_exit_layer is not None
                 and run >= c.early_exit_layer)
        B, T = input_ids.shape
        h = self.embedding(input_ids)  # (B, T, d)
        keys, values, convs, ssms, balance, z = [], [], [], [], [], []
        h_early = None
        for i, layer in enumerate(self.layers[:run]):
            y, k, v = layer.attn(layer.attn_norm(h), state.keys[:, i], state.values[:, i], state.filled)
            h = h + y
            keys.append(k), values.append(v)
            if layer.ssm is not None:
                j = len(ssms)
                if skip_ssm:  # nothing written into episodic memory
                    conv, ssm = state.conv[:, j], state.ssm[:, j]
                else:
                    y, conv, ssm = layer.ssm(layer.ssm_norm(h), state.conv[:, j], state.ssm[:, j])
                    h = h + y
                convs.append(conv), ssms.append(ssm)
            y, routing = layer.moe(layer.moe_norm(h), bias=expert_bias)
            h = h + y
            balance.append(routing.balance_loss()), z.append(routing.z_loss())
            if early and i + 1 == c.early_exit_layer:
                h_early = h
        for i in range(run, c.num_layers):  # skipped by an early exit: windows from h_run, SSM states kept
            layer = self.layers[i]
            k, v = layer.attn.write(layer.attn_norm(h), state.keys[:, i], state.values[:, i])
            keys.append(k), values.append(v)
            if layer.ssm is not None:
                convs.append(state.conv[:, len(ssms)]), ssms.append(state.ssm[:, len(ssms)])
        h = self.norm(h)
        new_state = HMSTState(
            keys=torch.stack(keys, 1), values=torch.stack(values, 1),
            filled=(state.filled + T).clamp(max=c.attention_window - 1),
            conv=torch.stack(convs, 1) if convs else state.conv, ssm=torch.stack(ssms, 1) if ssms else state.ssm,
            tokens=state.tokens + T)
        aux = {"balance": torch.stack(balance).mean(), "router_z": torch.stack(z).mean()}
        if h_early is not None:  # the LM loss of the early-exit head (same tokens as the loss)
            target = labels[:, 1:]
            nll = next_token_nll(self.logits(self.norm(h_early))[:, :-1], target)  # (B, T-1)
            aux["early_exit"] = nll.sum() / max(int((target != -100).sum()), 1)
        if return_logits or labels is not None or return_token_nll:
            out = lm_output(self.logits(h), input_ids, labels, new_state, return_logits, return_token_nll, aux)
        else:
            out = ModelOutput(loss=None, state=new_state, aux=aux, last_logits=self.logits(h[:, -1]))
        out.hidden = h if return_hidden else None
        ssm_blocks = 0 if skip_ssm else sum(i < run for i in c.ssm_layers)
        out.compute = {"layers": run, "ssm_blocks": ssm_blocks, "experts_per_token": c.top_k,
                       "flops_per_token": c.macs_per_token(run, ssm_blocks)}
        return out
