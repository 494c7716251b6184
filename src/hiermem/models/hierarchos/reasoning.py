"""The HRM part of Hierarchos, per token: the manager's pondering (ACT) at planning tokens and the
worker's refinement loop. Both explore on a *shadow* copy of a cell state; the real states
advance exactly once per token (the caller does that), in training and in generation alike.

Decisions (halting, convergence) are taken per batch row, so a row's result never depends on the
other rows: rows that stopped are masked out while the others go on.
"""

from __future__ import annotations

import torch

from hiermem.models.hierarchos.cells import cell_step


def ponder(cell, halt_w, halt_b, h_in, h_out, shadow, plan, max_steps: int, thresh: float):
    """Manager pondering with ACT for rows ``plan`` (B,) bool.

    Step 1 is the real output h_out (B, H_h); step n > 1 runs the cell again on h_in (B, H_h) from
    the shadow state (a copy of the state after the real step). p_n = sigmoid(halt(h_n)); the
    survival S_n = prod_{i<=n} (1 - p_i) (S_0 = 1). A row halts after step n when 1 - S_n >=
    ``thresh`` or n = ``max_steps``; with N its halting step the output is
    sum_{n<N} p_n S_{n-1} h_n + S_{N-1} h_N (weights summing to 1) and the ponder cost is the
    expected number of steps sum_{n<=N} S_{n-1}.

    Returns (output (B, H_h), ponder cost (B,), steps (B,) long, halting probabilities (B, max_steps)),
    zeros on rows that do not plan.
    """
    B = h_out.shape[0]
    active = plan.clone()
    h_n, survival = h_out, h_out.new_ones(B)
    out, cost = torch.zeros_like(h_out), h_out.new_zeros(B)
    steps = torch.zeros(B, dtype=torch.long, device=h_out.device)
    probs = []
    for n in range(1, max_steps + 1):
        if n > 1:
            h_n, shadow = cell_step(cell, h_in, shadow)
        p = torch.sigmoid(h_n @ halt_w + halt_b)  # (B,)
        live = active.to(p.dtype)
        probs.append(p * live)
        after = survival * (1 - p)
        halt = (1 - after >= thresh) | (n == max_steps)
        w = torch.where(halt, survival, p * survival) * live
        out = out + w[:, None] * h_n
        cost = cost + survival * live
        steps = steps + active.long()
        active = active & ~halt
        survival = after
        if not bool(active.any()):
            break
    probs = torch.stack(probs + [torch.zeros_like(probs[0])] * (max_steps - len(probs)), 1)
    return out, cost, steps, probs


def refine(cell, w_ctx, w_drift, base, drift, prev_out, shadow, max_steps: int, atol: float, threshold: float):
    """The worker's refinement of the context drift on a shadow state.

    base (B, H_l): the worker input without the drift term (W_e enc + W_c context + b); the input is
    clamp(base + W_c drift, +-50). drift (B, C): the initial drift (from the previous real worker
    output). Each step: out_n = cell(input, shadow); drift <- clamp(drift + tanh(W_d out_n), +-5);
    hinge_n = relu(sum(drift^2) - threshold). A row stops after the step where
    max|out_n - out_{n-1}| < ``atol`` (out_0 = ``prev_out``, the previous real output), or after
    ``max_steps``.

    Returns (final worker input (B, H_l), final drift (B, C), commitment = mean hinge over the row's
    steps (B,), steps (B,) long).
    """
    B = base.shape[0]
    inp = (base + drift @ w_ctx.t()).clamp(-50.0, 50.0)
    active = torch.ones(B, dtype=torch.bool, device=base.device)
    cost, steps = base.new_zeros(B), torch.zeros(B, dtype=torch.long, device=base.device)
    for _ in range(max_steps):
        out, shadow = cell_step(cell, inp, shadow)
        live = active.to(base.dtype)
        drift = torch.where(active[:, None], (drift + torch.tanh(out @ w_drift.t())).clamp(-5.0, 5.0), drift)
        cost = cost + live * torch.relu(drift.square().sum(-1) - threshold)
        steps = steps + active.long()
        inp = torch.where(active[:, None], (base + drift @ w_ctx.t()).clamp(-50.0, 50.0), inp)
        active = active & ~((out - prev_out).abs().amax(-1) < atol)
        prev_out = out
        if not bool(active.any()):
            break
    return inp, drift, cost / steps.to(cost.dtype), steps
