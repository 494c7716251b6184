"""Hierarchos: a Titans-style long-term memory feeding an HRM manager/worker of RWKV-style cells.

Per token t of a row (now = the row's clock, the tokens it has read since its state was fresh)::

    q     = clamp(W_q [x_t; prev_context], +-10)                         LTM query
    read  = top-k of the LTM (see memory.py): a_j, m_j, age_j
    enc   = clamp(gelu(W_in [x_t; persistent; gate * (a_j m_j + age_enc(age_j))_j]), +-30)
    h_in  = W_h enc + W_fb worker_out;  h_out, manager = cell(h_in, manager)       (one real step)
    if now % h_stride == 0:  prev_context = target_context
                             target_context = clamp(W_ctx ponder(h_in, h_out, shadow manager), +-50)
    ctx   = lerp(prev_context, target_context, (now % h_stride) / h_stride)
    drift = clamp(tanh(W_d worker_out), +-5); refine drift on a shadow worker (reasoning.py)
    worker_out, worker = cell(clamp(W_l [enc; ctx + drift], +-50), worker)      (one real step)
    feat  = enc + W_o worker_out;  logits_t = head(LN(feat))
    LTM surprise update with v = clamp(W_v feat, +-ltm_clamp) (closed form, memory.py)

Everything a row carries is in :class:`HierarchosState` (cell states, worker output, contexts,
LTM fast values, momentum, write times, clock), and training, evaluation and generation run this
same loop: the states advance once per token, halting and convergence use the same rules,
the memory is written in every mode, so chunked calls equal one long call and a decoder fed
token by token equals teacher forcing.

Speed: the embedding's shares of the query and encoder products (and the persistent memory's,
a constant) are one matmul over all tokens; each cell step is four matmuls (cells.py); the LTM
touches k slots per token; the vocabulary projection runs once after the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.models.base import HiermemModel, ModelOutput, lm_output
from hiermem.models.hierarchos.cells import RWKVCell, cell_step
from hiermem.models.hierarchos.config import RUNTIME_FIELDS, HierarchosConfig
from hiermem.models.hierarchos.memory import LongTermMemory
from hiermem.models.hierarchos.reasoning import ponder, refine
from hiermem.models.lora import linear_weight
from hiermem.models.state import ModelState, batch_field

TRACE_KEYS = ("plan", "h_steps", "halt_probs", "ponder", "l_steps", "commitment", "ltm_index", "ltm_weight",
              "ltm_read", "ltm_target")


@dataclass
class HierarchosState(ModelState):
    """manager (B, 5, h_hidden), worker (B, 5, l_hidden): RWKV cell states (sx, aa, bb, pp, sx_cm);
    worker_out (B, l_hidden): the last real worker output; prev_context, target_context (B, C);
    ltm_fast, ltm_mom (B, S, V): fast values and momentum of each slot as of its last write;
    ltm_time (B, S) long: time of that write (-1 = never); clock (B,) long: tokens each row has
    read since it was fresh; tokens: tokens read through this state. Online learning (chat):
    ltm_lr (B,) or None: the surprise update's step size for the tokens that follow (None: the
    config's ltm_lr); ltm_steps: learning-rate schedule steps taken (chat turns learnt)."""

    KIND: ClassVar[str] = "hierarchos-state"
    manager: torch.Tensor = batch_field(0)
    worker: torch.Tensor = batch_field(0)
    worker_out: torch.Tensor = batch_field(0)
    prev_context: torch.Tensor = batch_field(0)
    target_context: torch.Tensor = batch_field(0)
    ltm_fast: torch.Tensor = batch_field(0)
    ltm_mom: torch.Tensor = batch_field(0)
    ltm_time: torch.Tensor = batch_field(0)
    clock: torch.Tensor = batch_field(0)
    tokens: int = 0
    ltm_lr: torch.Tensor | None = batch_field(0, default=None)
    ltm_steps: int = 0

    def stats(self) -> dict:
        """Adds the memory's written slots, the norm of its stored fast values and the longest clock."""
        return {**super().stats(), "ltm_slots_written": int((self.ltm_time >= 0).sum()),
                "ltm_fast_norm": float(self.ltm_fast.detach().float().norm()),
                "clock": int(self.clock.max()) if self.clock.numel() else 0}


@dataclass
class HierarchosOutput(ModelOutput):
    """ModelOutput plus, with ``return_trace=True``, per-token diagnostics (B, T, ...): plan (bool),
    h_steps / halt_probs (B, T, max_h_steps) / ponder of the manager (0 off planning tokens),
    l_steps / commitment of the worker, ltm_index / ltm_weight (B, T, k), ltm_read and
    ltm_target (B, T, V) of the memory (the read r and the value v it was pulled towards)."""

    trace: dict | None = None


class Hierarchos(HiermemModel):
    """Hierarchos LM trained from scratch (see the module docstring)."""

    config_class: ClassVar[type] = HierarchosConfig
    state_class: ClassVar[type] = HierarchosState
    default_trainable: ClassVar[str] = "full"

    def __init__(self, config: HierarchosConfig):
        super().__init__()
        self.config = c = config
        C, P, Hh, Hl = c.context_dim, c.persistent_dim, c.h_hidden, c.l_hidden
        self.tok_emb = nn.Embedding(c.vocab_size, C)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.persistent = nn.Parameter(torch.randn(P) * 0.02)
        self.ltm = LongTermMemory(c.ltm_slots, c.ltm_key_dim, c.ltm_val_dim, c.ltm_topk)
        self.qproj = nn.Linear(2 * C, c.ltm_key_dim, bias=False)
        self.val_proj = nn.Linear(C, c.ltm_val_dim, bias=False)
        self.in_proj = nn.Linear(C + P + c.ltm_topk * c.ltm_val_dim, C)
        self.h_in_proj = nn.Linear(C, Hh)
        self.l_feedback_proj = nn.Linear(Hl, Hh, bias=False)
        self.manager = RWKVCell(Hh)
        self.h_to_context = nn.Linear(Hh, C)
        self.h_halt_proj = nn.Linear(Hh, 1)
        self.l_input_proj = nn.Linear(2 * C, Hl)
        self.worker = RWKVCell(Hl)
        self.context_drift_proj = nn.Linear(Hl, C, bias=False)
        self.l_to_out = nn.Linear(Hl, C)
        self.out_norm = nn.LayerNorm(C)
        self.head = None if c.tie_embeddings else nn.Parameter(torch.randn(c.vocab_size, C) * 0.02)
        self.drop = nn.Dropout(c.dropout)
        for small in (self.l_feedback_proj, self.context_drift_proj):  # feedback and drift start gently
            nn.init.normal_(small.weight, std=0.01)

    # --- protocol ---------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> HierarchosState:
        c, w = self.config, self.tok_emb.weight
        B, S, V = batch_size, c.ltm_slots, c.ltm_val_dim
        return HierarchosState(
            manager=self.manager.init_state(B, w), worker=self.worker.init_state(B, w),
            worker_out=w.new_zeros(B, c.l_hidden), prev_context=w.new_zeros(B, c.context_dim),
            target_context=w.new_zeros(B, c.context_dim), ltm_fast=w.new_zeros(B, S, V),
            ltm_mom=w.new_zeros(B, S, V), ltm_time=torch.full((B, S), -1, dtype=torch.long, device=w.device),
            clock=torch.zeros(B, dtype=torch.long, device=w.device))

    @property
    def aux_weights(self) -> dict[str, float]:
        return {"ponder": self.config.ponder_loss_weight, "commitment": self.config.commitment_loss_weight}

    def architecture_fields(self) -> tuple[str, ...]:
        return tuple(k for k in self.config.to_dict() if k not in RUNTIME_FIELDS)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.head is None else self.head

    def ltm_contents(self, state: HierarchosState) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's fast values and momentum (B, S, V) of every slot as of the last token read."""
        c = self.config
        return LongTermMemory.dense(state.ltm_fast, state.ltm_mom, state.ltm_time, state.clock,
                                    c.ltm_momentum, 1.0 - c.ltm_forget)

    # --- online learning (chat) -------------------------------------------------------------
    LTM_FIELDS: ClassVar[tuple[str, ...]] = ("ltm_fast", "ltm_mom", "ltm_time", "clock")  # what it learnt

    def with_ltm_lr(self, state: HierarchosState, lr: float, steps: int | None = None) -> HierarchosState:
        """``state`` whose next tokens update the memory with step size ``lr`` (every row);
        ``steps``: the schedule steps to record (unchanged when None)."""
        rows = torch.full((state.batch_size,), float(lr), dtype=state.ltm_fast.dtype, device=state.ltm_fast.device)
        return dataclasses.replace(state, ltm_lr=rows, ltm_steps=state.ltm_steps if steps is None else steps)

    def weaken_ltm(self, state: HierarchosState, since: int, scale: float) -> tuple[HierarchosState, int]:
        """Negative feedback: the slots read (hence written) at or after time ``since`` keep
        ``scale`` x their fast values (what was learnt in them) and lose their momentum.
        Returns (the new state, the number of slots weakened)."""
        hit = state.ltm_time >= since  # (B, S)
        keep = torch.where(hit, scale, 1.0).to(state.ltm_fast.dtype)[..., None]
        mom = state.ltm_mom.masked_fill(hit[..., None], 0.0)
        return dataclasses.replace(state, ltm_fast=state.ltm_fast * keep, ltm_mom=mom), int(hit.sum())

    # --- the recurrence ---------------------------------------------------------------------
    def recur(self, x: torch.Tensor, state: HierarchosState, trace: bool = False):
        """Read embeddings x (B, L, C) after ``state``. Returns (features (B, L, C), new state,
        aux losses, trace dict or None)."""
        c = self.config
        B, L, C = x.shape
        st = state.to(dtype=x.dtype)
        P, stride, rho, clamp = c.persistent_dim, c.h_stride, 1.0 - c.ltm_forget, c.ltm_clamp
        mgr, wrk = self.manager.fused(), self.worker.fused()
        w_in, w_l, w_q = (linear_weight(m) for m in (self.in_proj, self.l_input_proj, self.qproj))  # LoRA included
        qx = x @ w_q[:, :C].t()  # (B, L, K): the token's share of the query, all tokens at once
        ex = x @ w_in[:, :C].t() + (w_in[:, C:C + P] @ self.persistent + self.in_proj.bias)  # (B, L, C)
        w_q_ctx, w_in_mem, w_l_enc, w_l_ctx = w_q[:, C:], w_in[:, C + P:], w_l[:, :C], w_l[:, C:]
        w_drift, halt_w = linear_weight(self.context_drift_proj), linear_weight(self.h_halt_proj)[0]
        w_fb, halt_b = linear_weight(self.l_feedback_proj), self.h_halt_proj.bias[0]
        hs, ls = st.manager.unbind(1), st.worker.unbind(1)
        wout, prev, target, clock = st.worker_out, st.prev_context, st.target_context, st.clock
        fast, mom, stamp = st.ltm_fast.clone(), st.ltm_mom.clone(), st.ltm_time.clone()  # written in place
        lr = c.ltm_lr if st.ltm_lr is None else st.ltm_lr[:, None, None]  # a row's own step size (chat)
        feats, commits = [], []
        ponder_sum, plans = x.new_zeros(()), 0
        rec = {k: [] for k in TRACE_KEYS} if trace else None
        for t in range(L):
            now = clock + t  # (B,)
            q = (qx[:, t] + prev @ w_q_ctx.t()).clamp(-10.0, 10.0)
            idx, a, age, m, view = self.ltm.read(q, fast, stamp, now, rho)
            enc = F.gelu(ex[:, t] + view.flatten(1) @ w_in_mem.t()).clamp(-30.0, 30.0)
            # manager: one real step every token, a new goal (ACT pondering) at planning tokens
            h_in = self.h_in_proj(enc) + wout @ w_fb.t()
            h_out, hs = cell_step(mgr, h_in, hs)
            phase = now % stride
            plan = phase == 0
            h_steps = torch.zeros_like(now)
            if bool(plan.any()):
                final, cost, h_steps, probs = ponder(mgr, halt_w, halt_b, h_in, h_out, hs, plan,
                                                     c.max_h_steps, c.h_halt_thresh)
                goal = self.h_to_context(final).clamp(-50.0, 50.0)
                prev = torch.where(plan[:, None], target, prev)
                target = torch.where(plan[:, None], goal, target)
                ponder_sum, plans = ponder_sum + (cost * plan).sum(), plans + int(plan.sum())
            else:
                cost, probs = x.new_zeros(B), x.new_zeros(B, c.max_h_steps)
            ctx = prev + (phase.to(x.dtype) / stride)[:, None] * (target - prev)
            # worker: refine the drift on a shadow state, then one real step
            base = F.linear(enc, w_l_enc, self.l_input_proj.bias) + ctx @ w_l_ctx.t()
            drift = torch.tanh(wout @ w_drift.t()).clamp(-5.0, 5.0)
            inp, drift, commit, l_steps = refine(wrk, w_l_ctx, w_drift, base, drift, wout, ls, c.max_l_steps,
                                                 c.l_conv_atol, c.commitment_threshold)
            wout, ls = cell_step(wrk, inp, ls)
            feat = enc + self.l_to_out(wout)
            # the memory learns from the token (surprise step, closed form)
            v = self.val_proj(feat).clamp(-clamp, clamp)
            r = LongTermMemory.write(fast, mom, stamp, idx, a, age, m, v, now, lr, c.ltm_momentum, rho, clamp)
            feats.append(feat)
            commits.append(commit)
            if trace:
                for k, val in zip(TRACE_KEYS, (plan, h_steps, probs, cost * plan, l_steps, commit, idx, a, r, v)):
                    rec[k].append(val)
        new_state = HierarchosState(
            manager=torch.stack(hs, 1), worker=torch.stack(ls, 1), worker_out=wout, prev_context=prev,
            target_context=target, ltm_fast=fast, ltm_mom=mom, ltm_time=stamp, clock=clock + L,
            tokens=state.tokens + L, ltm_lr=state.ltm_lr, ltm_steps=state.ltm_steps)
        aux = {"ponder": ponder_sum / max(plans, 1), "commitment": torch.stack(commits, 1).mean()}
        traced = {k: torch.stack(v, 1) for k, v in rec.items()} if trace else None
        return torch.stack(feats, 1), new_state, aux, traced

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) from features (..., C)."""
        return F.linear(self.drop(self.out_norm(feats)), self.output_weight)

    def forward(self, input_ids: torch.Tensor, state: HierarchosState | None = None,
                labels: torch.Tensor | None = None, return_logits: bool = True, return_token_nll: bool = False,
                return_trace: bool = False) -> HierarchosOutput:
        """Read input_ids (B, T) after ``state`` (fresh when None).

        labels (B, T): HF convention (shifted inside, -100 ignored). Without return_logits, labels
        and token NLL only the last position's logits are made (generation, reading).
        aux: "ponder" (expected manager steps per planning token) and "commitment" (drift hinge).
        """
        state = self.checked_state(input_ids, state, labels)
        B, L = input_ids.shape
        x = self.drop(self.tok_emb(input_ids))
        if torch.is_autocast_enabled(x.device.type):  # the recurrence runs in the weights' precision
            with torch.autocast(x.device.type, enabled=False):
                feats, new_state, aux, trace = self.recur(x, state, return_trace)
        else:
            feats, new_state, aux, trace = self.recur(x, state, return_trace)
        if return_logits or labels is not None or return_token_nll:
            out = lm_output(self.logits(feats), input_ids, labels, new_state, return_logits, return_token_nll, aux)
            out = HierarchosOutput(**vars(out))
        else:
            out = HierarchosOutput(loss=None, state=new_state, aux=aux, last_logits=self.logits(feats[:, -1]))
        out.trace = trace
        return out
