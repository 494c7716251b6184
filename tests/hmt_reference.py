"""A naive HMT written from the paper's formulas (arXiv 2405.06067), independent of hiermem's model.

A plain loop over segments; the backbone's own forward is called once per pass (hidden states
from ``backbone.model``, logits from the full ``backbone`` forward); the bank is rebuilt slot by slot.
Per segment n with tokens x (B, L):
  S = h_last([bos?, T, E(src), T])      src = x[:j] ("segment") or the previous segment's last j
  P = softmax((S Wq)(M Wk)^T / sqrt(h)) M          (stage 2, >= 2 slots; 1 slot: M; none: m_0)
  P = m_{n-1} or m_0                                (stage 1)
  H = h([bos?, P, E(x_{n-1}[-k:]), E(x), P]);  logits at the x positions;  m_n = H[:, -1]
"""

from __future__ import annotations

import math

import torch


def reference_hmt(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (B, T, V) for ``ids`` (B, T), T a multiple of L, and the final bank (B, n, d)."""
    cfg, bb = model.config, model.backbone
    L, k, j = cfg.segment_length, cfg.sensory_length, cfg.summary_tokens
    emb = bb.get_input_embeddings()
    B = ids.shape[0]
    bos = [emb(torch.full((B, 1), model.bos_token_id))] if cfg.segment_bos else []
    T = model.summary_prompt.expand(B, 1, -1)
    Wq, Wk = model.recall.query.weight, model.recall.key.weight  # (h, d)
    d = model.initial_memory.shape[-1]
    M, U = ids.new_zeros(B, 0, d, dtype=torch.float64), ids.new_zeros(B, 0, dtype=torch.float64)  # bank, usage
    last, logits = None, []
    for n in range(ids.shape[1] // L):
        x = ids[:, n * L:(n + 1) * L]
        previous = ids[:, (n - 1) * L:n * L] if n else ids[:, :0]
        if cfg.stage == 1:
            prompt, weights = (last if last is not None else model.initial_memory.expand(B, 1, -1)), None
        elif M.shape[1] == 0:
            prompt, weights = model.initial_memory.expand(B, 1, -1), None
        else:
            src = x[:, :j] if cfg.summary_source == "segment" else previous[:, -j:]
            S = bb.model(inputs_embeds=torch.cat([*bos, T, emb(src), T], 1)).last_hidden_state[:, -1:]
            scores = (S @ Wq.T) @ (M @ Wk.T).transpose(1, 2) / math.sqrt(Wq.shape[0])  # (B, 1, n)
            weights = scores.softmax(-1)
            prompt = weights @ M
            weights = weights[:, 0]  # (B, n)
        sensory = previous[:, L - k:] if k else previous[:, :0]
        embeds = torch.cat([*bos, prompt, emb(sensory), emb(x), prompt], 1)
        start = len(bos) + 1 + sensory.shape[1]
        logits.append(bb(inputs_embeds=embeds).logits[:, start:start + L])
        m = bb.model(inputs_embeds=embeds).last_hidden_state[:, -1:]  # (B, 1, d)
        if weights is not None and cfg.eviction == "attention":
            U = cfg.eviction_decay * U + (1 - cfg.eviction_decay) * weights
        if M.shape[1] == cfg.cache_size:
            rows = []
            for b in range(B):
                victim = 0 if cfg.eviction == "fifo" else int(U[b].argmin())
                keep = [i for i in range(M.shape[1]) if i != victim]
                rows.append((M[b, keep], U[b, keep]))
            M, U = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        fresh = U.mean(1, keepdim=True) if U.shape[1] else torch.ones(B, 1, dtype=U.dtype)
        M, U = torch.cat([M, m], 1), torch.cat([U, fresh], 1)
        last = m
    return torch.cat(logits, 1), M
