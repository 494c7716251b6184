"""A naive Hierarchos: the formulas as a plain loop over tokens and batch rows, on the parameters of
a ``Hierarchos`` (every projection on its concatenated input, every RWKV product separate, the
memory updated densely - every slot decays every token -, halting and convergence decided with
Python scalars). The tests check the fast model against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rwkv_step(cell, x, state):
    """One RWKV-style cell step from its definition: x (H,), state (5, H) -> (out (H,), state)."""
    sx, aa, bb, pp, sx_cm = state
    xn = cell.ln1(x)
    mk, mv, mr = cell.mix

    def mix(m, other):
        return m * xn + (1 - m) * other

    k, v, r = cell.key(mix(mk, sx)), cell.value(mix(mv, sx)), torch.sigmoid(cell.receptance(mix(mr, sx)))
    u, w = cell.time_first, -torch.exp(cell.time_decay)
    p = torch.maximum(pp, u + k)
    wkv = (torch.exp(pp - p) * aa + torch.exp(u + k - p) * v) / (torch.exp(pp - p) * bb + torch.exp(u + k - p))
    q = torch.maximum(pp + w, k)
    aa2 = torch.exp(pp + w - q) * aa + torch.exp(k - q) * v
    bb2 = torch.exp(pp + w - q) * bb + torch.exp(k - q)
    x1 = x + cell.output(r * wkv)
    xn2 = cell.ln2(x1)
    kc = cell.key_cm(cell.mix_cm[0] * xn2 + (1 - cell.mix_cm[0]) * sx_cm)
    rc = cell.receptance_cm(cell.mix_cm[1] * xn2 + (1 - cell.mix_cm[1]) * sx_cm)
    out = x1 + torch.sigmoid(rc) * cell.value_cm(torch.relu(kc) ** 2)
    return out, torch.stack([xn, aa2, bb2, q, xn2])


def age_encoding(model, age: int, dtype):
    V = model.config.ltm_val_dim
    args = age * model.ltm.time_freqs.double()
    pe = torch.cat([torch.sin(args), torch.cos(args)])
    return torch.cat([pe, pe.new_zeros(V - pe.shape[0])]).to(dtype)


def naive_forward(model, input_ids, state=None):
    """logits (B, L, V), the final per-row values and a trace (lists per row of per-token dicts)."""
    c = model.config
    B, L = input_ids.shape
    state = state if state is not None else model.init_state(B)
    rho, beta, lim = 1.0 - c.ltm_forget, c.ltm_momentum, c.ltm_clamp
    logits, finals, traces = [], [], []
    for b in range(B):
        hs, ls = state.manager[b], state.worker[b]
        wout, prev, target = state.worker_out[b], state.prev_context[b], state.target_context[b]
        # dense memory: every slot's current fast value and momentum, and its last write time
        fast, mom = model.ltm_contents(state.select_rows(torch.tensor([b])))
        fast, mom, stamp = fast[0], mom[0], state.ltm_time[b].tolist()
        clock = int(state.clock[b])
        row_logits, row_trace = [], []
        for t in range(L):
            now = clock + t
            x = model.tok_emb(input_ids[b, t])
            q = torch.clamp(model.qproj(torch.cat([x, prev])), -10, 10)
            sims = model.ltm.keys @ q / c.ltm_key_dim ** 0.5
            idx = torch.topk(sims.detach(), c.ltm_topk).indices.tolist()
            a = torch.softmax(sims[idx], 0)
            memory = model.ltm.vals + fast
            gate = torch.sigmoid(model.ltm.gate_logit)
            reads = [gate * (a[j] * memory[s] + age_encoding(model, now - stamp[s], x.dtype)) for j, s in enumerate(idx)]
            enc = torch.clamp(F.gelu(model.in_proj(torch.cat([x, model.persistent, *reads]))), -30, 30)
            h_in = model.h_in_proj(enc) + model.l_feedback_proj(wout)
            h_out, hs = rwkv_step(model.manager, h_in, hs)
            info = {"plan": now % c.h_stride == 0, "h_steps": 0, "ponder": 0.0, "halt_probs": []}
            if info["plan"]:
                shadow, h_n, survival, total, cost = hs, h_out, 1.0, 0, 0
                for n in range(1, c.max_h_steps + 1):
                    if n > 1:
                        h_n, shadow = rwkv_step(model.manager, h_in, shadow)
                    p = torch.sigmoid(model.h_halt_proj(h_n))[0]
                    info["halt_probs"].append(float(p.detach()))
                    cost = cost + survival
                    after = survival * (1 - p)
                    if float((1 - after).detach()) >= c.h_halt_thresh or n == c.max_h_steps:
                        total = total + survival * h_n
                        break
                    total = total + p * survival * h_n
                    survival = after
                info["h_steps"], info["ponder"] = n, cost
                prev, target = target, torch.clamp(model.h_to_context(total), -50, 50)
            ctx = prev + (now % c.h_stride) / c.h_stride * (target - prev)
            drift = torch.clamp(torch.tanh(model.context_drift_proj(wout)), -5, 5)
            inp = torch.clamp(model.l_input_proj(torch.cat([enc, ctx + drift])), -50, 50)
            shadow, last, hinges, info["l_changes"] = ls, wout, [], []
            for _ in range(c.max_l_steps):
                out, shadow = rwkv_step(model.worker, inp, shadow)
                drift = torch.clamp(drift + torch.tanh(model.context_drift_proj(out)), -5, 5)
                hinges.append(torch.relu((drift ** 2).sum() - c.commitment_threshold))
                inp = torch.clamp(model.l_input_proj(torch.cat([enc, ctx + drift])), -50, 50)
                change = float((out - last).abs().max().detach())
                info["l_changes"].append(change)
                last = out
                if change < c.l_conv_atol:
                    break
            info["l_steps"], info["commitment"] = len(hinges), sum(hinges) / len(hinges)
            wout, ls = rwkv_step(model.worker, inp, ls)
            feat = enc + model.l_to_out(wout)
            row_logits.append(F.linear(model.out_norm(feat), model.output_weight))
            # surprise update of the whole memory (slots not read get no gradient, only decay)
            v = torch.clamp(model.val_proj(feat), -lim, lim)
            r = sum(a[j] * memory[s] for j, s in enumerate(idx))
            grad = torch.zeros_like(fast)
            touched = torch.zeros(fast.shape[0], 1, dtype=fast.dtype)
            for j, s in enumerate(idx):
                grad = grad.index_put((torch.tensor([s]),), (a[j] * (r - v))[None])
                touched[s] = 1.0
                stamp[s] = now
            mom = torch.clamp(beta * mom + grad, -2.5 * lim, 2.5 * lim)
            fast = torch.clamp(rho * fast - c.ltm_lr * touched * mom, -lim, lim)
            info.update(ltm_index=idx, ltm_weight=a, ltm_read=r, ltm_target=v)
            row_trace.append(info)
        logits.append(torch.stack(row_logits))
        finals.append({"manager": hs, "worker": ls, "worker_out": wout, "prev_context": prev,
                       "target_context": target, "fast": fast, "mom": mom, "stamp": stamp})
        traces.append(row_trace)
    return torch.stack(logits), finals, traces
