"""A naive HMST: the formulas as plain loops over the parameters of an ``HMST`` — the scan one token
at a time, attention one query at a time over its window with absolute RoPE positions, the
convolution from its definition, every token through its top-k experts one by one. The tests check
the model against it; the scan benchmark uses :func:`sequential_scan` as the per-token baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequential_scan(u, log_a, b, c, state):
    """S_t = exp(log_a_t) S_{t-1} + u_t b_t^T, y_t = S_t c_t, token by token.

    u (B, T, H, P), log_a (B, T, H), b, c (B, T, N), state (B, H, P, N) -> (y (B, T, H, P), S_T)."""
    ys = []
    for t in range(u.shape[1]):
        state = torch.exp(log_a[:, t])[:, :, None, None] * state + u[:, t, :, :, None] * b[:, t, None, None, :]
        ys.append((state * c[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, 1), state


def naive_moe(moe, x, bias=False):
    """x (n, d) -> (y (n, d), chosen experts (n, k)): each token through its top-k experts in turn;
    ``bias``: the router logits include ``moe.expert_bias``."""
    ys, chosen = [], []
    for tok in x:
        probs = (tok @ moe.router.weight.t() + (moe.expert_bias if bias else 0)).softmax(-1)
        top, idx = probs.topk(moe.top_k)
        gates = top / top.sum()
        out = 0
        for g, e in zip(gates, idx.tolist()):
            w_gate, w_up = moe.w_in[e][:moe.ffn], moe.w_in[e][moe.ffn:]
            out = out + g * (moe.w_out[e] @ (F.silu(w_gate @ tok) * (w_up @ tok)))
        ys.append(out)
        chosen.append(idx)
    return torch.stack(ys), torch.stack(chosen)


def _rms(norm, x):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rotate(x, pos, theta):
    hd = x.shape[-1]
    inv = theta ** -(torch.arange(0, hd, 2, dtype=x.dtype) / hd)
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    a, b = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-b, a], -1) * sin


def naive_attention(attn, x):
    """x (B, T, d): query t attends keys max(0, t - W + 1) .. t, rotated by absolute positions."""
    B, T, _ = x.shape
    H, G, hd, W = attn.H, attn.G, attn.hd, attn.W
    q = (x @ attn.q_proj.weight.t()).view(B, T, H, hd)
    k = (x @ attn.k_proj.weight.t()).view(B, T, G, hd)
    v = (x @ attn.v_proj.weight.t()).view(B, T, G, hd)
    out = torch.zeros(B, T, H, hd, dtype=x.dtype)
    for t in range(T):
        for h in range(H):
            g = h // (H // G)
            qt = _rotate(q[:, t, h], t, attn.c.rope_theta)
            lo = max(0, t - W + 1)
            ks = torch.stack([_rotate(k[:, s, g], s, attn.c.rope_theta) for s in range(lo, t + 1)], 1)
            w = ((ks @ qt[:, :, None]).squeeze(-1) / hd ** 0.5).softmax(-1)  # (B, window)
            out[:, t, h] = (w[:, :, None] * v[:, lo:t + 1, g]).sum(1)
    return out.reshape(B, T, H * hd) @ attn.o_proj.weight.t()


def naive_ssm(ssm, x):
    """x (B, T, d) -> (y (B, T, d), final scan state): convolution and scan from their definitions."""
    B, T, _ = x.shape
    K = ssm.c.ssm_conv
    z, xbc, dt = (x @ ssm.in_proj.weight.t()).split([ssm.inner, ssm.c.ssm_conv_channels, ssm.H], -1)
    conv = torch.stack([sum(ssm.conv_weight[:, K - 1 - j] * xbc[:, t - j] for j in range(min(K, t + 1)))
                        + ssm.conv_bias for t in range(T)], 1)
    xs, b, c = F.silu(conv).split([ssm.inner, ssm.N, ssm.N], -1)
    step = F.softplus(dt + ssm.dt_bias)
    A = -torch.exp(ssm.A_log)
    xh = xs.view(B, T, ssm.H, ssm.P)
    y, state = sequential_scan(xh * step[..., None], step * A, b, c, x.new_zeros(B, ssm.H, ssm.P, ssm.N))
    y = (y + ssm.D[:, None] * xh).reshape(B, T, ssm.inner) * F.silu(z)
    return y @ ssm.out_proj.weight.t(), state


def naive_hidden(model, ids, layers=None, skip_ssm=False, expert_bias=False):
    """The residual stream (B, T, d) of ``model`` after its first ``layers`` layers (None: all) over
    ids (B, T) from an empty state, and the final states of the SSM blocks run; ``skip_ssm`` and
    ``expert_bias``: the gates of ``HMST.forward``."""
    h = model.embedding.weight[ids]
    states = []
    for layer in model.layers[:layers]:
        h = h + naive_attention(layer.attn, _rms(layer.attn_norm, h))
        if layer.ssm is not None and not skip_ssm:
            y, s = naive_ssm(layer.ssm, _rms(layer.ssm_norm, h))
            h = h + y
            states.append(s)
        y, _ = naive_moe(layer.moe, _rms(layer.moe_norm, h).flatten(0, 1), expert_bias)
        h = h + y.view_as(h)
    return h, states


def naive_head(model, h):
    """Vocabulary logits from a residual stream h (..., d): the final norm and the head."""
    w = model.embedding.weight if model.head is None else model.head.weight
    return _rms(model.norm, h) @ w.t()


def naive_forward(model, ids, layers=None, skip_ssm=False, expert_bias=False):
    """logits (B, T, V) of ``model`` over ids (B, T) from an empty state (with the gates of
    :func:`naive_hidden`; ``layers`` = ``exit_layer``), and the final states of the SSM blocks run."""
    h, states = naive_hidden(model, ids, layers, skip_ssm, expert_bias)
    return naive_head(model, h), states
