"""How a hiermem model (any family) and the sliding-window backbone read a long input, then answer greedily."""

from __future__ import annotations

import torch

from hiermem.inference.generate import GenerationConfig, generate, make_decoder


@torch.no_grad()
def read_prompt(model, ids: torch.Tensor):
    """Read ``ids`` (B, T) but its last token into a fresh decoder (models with segments, e.g. HMT:
    only the whole segments before the last token, as they read in training).

    Returns the decoder and the ids left to feed it (B, >= 1).
    """
    L = getattr(model.config, "segment_length", None)
    k = (ids.shape[1] - 1) // L * L if L else ids.shape[1] - 1
    decoder = make_decoder(model, batch_size=ids.shape[0])
    if k:
        decoder.feed(ids[:, :k])
    return decoder, ids[:, k:]


@torch.no_grad()
def model_generate(model, ids: torch.Tensor, cfg: GenerationConfig, decode=None):
    """Continue ``ids`` (T,) with any hiermem model through :func:`hiermem.inference.generate.generate`
    (its output; with ``decode``, ``.text`` is cut before any of ``cfg.stop_strings``)."""
    decoder, rest = read_prompt(model, ids[None].to(model.device))
    return generate(model, rest, cfg, decoder=decoder, decode=decode)


def model_greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of ``ids`` (T,) by any hiermem model (a final EOS dropped)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id)
    out = model_generate(model, ids, cfg).tokens[0].tolist()
    return out[:-1] if out and out[-1] == eos_token_id else out


hmt_generate, hmt_greedy = model_generate, model_greedy  # names the lm-eval adapter and older tests use


@torch.no_grad()
def sliding_greedy(backbone, ids: torch.Tensor, window: int, max_new_tokens: int,
                   eos_token_id: int | None = None, bos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of ``ids`` (T,) by a HF causal LM that sees only the last ``window`` tokens.

    Every step rereads the window (prompt and generated tokens alike), so the backbone never sees
    more than ``window`` tokens, as in the ``sliding`` perplexity baseline.
    """
    seq = ids.to(backbone.device)
    prefix = seq.new_full((1,), bos_token_id) if bos_token_id is not None else seq[:0]
    out: list[int] = []
    for _ in range(max_new_tokens):
        ctx = torch.cat([prefix, seq[-window:]])[None]  # (1, <= 1 + window)
        tok = backbone(input_ids=ctx, use_cache=False, logits_to_keep=1).logits[0, -1].argmax()
        if int(tok) == eos_token_id:
            break
        out.append(int(tok))
        seq = torch.cat([seq, tok[None]])
    return out
