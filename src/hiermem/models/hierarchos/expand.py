"""Grow a trained Hierarchos into a wider one that computes exactly the same function.

Every C-, H_h- or H_l-wide vector is LayerNorm-ed somewhere (the output norm, the cells' two norms),
and a LayerNorm over a wider vector keeps its mean and variance only when each old unit is repeated
the same number of times. So ``context_dim``, ``h_hidden`` and ``l_hidden`` grow by whole factors k:

- producers (embedding columns, Linear rows and biases, norm gains, per-channel cell parameters)
  repeat each old unit k times (tiled: new unit j copies old unit j mod width);
- consumers (Linear columns) give each copy a random positive share of the old weight, the k shares
  of every element summing to 1: the sum is unchanged, and since the shares differ per element the
  copies get gradients of different directions, so training (AdamW included) tells them apart;
- with tied embeddings the output norm's gain and bias take the shares (the head reads the
  repeated embedding columns);
- each cell's channel-mixing layer also gets 4 (k - 1) H fresh hidden units: random input weights,
  zero output weights (they change nothing until trained);
- the commitment hinge sums drift^2 over C: its threshold is multiplied by k_C and its loss weight
  divided by k_C, so the training objective is unchanged too (the reported "commitment" aux is k_C
  times the old one).

``max_length`` sets ``n_ctx`` (the truncated-BPTT window; Hierarchos has no positional table, so any
value keeps the function). ``ltm_slots`` cannot grow function-preservingly: the top-k read ranks
every slot by q.key with a bias-free query, and no new key ranks below all old ones for every q, so
new slots would change which slots are read; it is refused. Shrinking is refused everywhere.
"""

from __future__ import annotations

import torch

from hiermem.errors import ConfigError
from hiermem.models.hierarchos.cells import FFN_MULT
from hiermem.models.hierarchos.config import HierarchosConfig
from hiermem.models.hierarchos.model import Hierarchos, HierarchosState

GROWABLE = ("context_dim", "h_hidden", "l_hidden")


def _factor(name: str, old: int, new: int | None) -> int:
    if new is None or new == old:
        return 1
    if not isinstance(new, int) or isinstance(new, bool) or new < old:
        raise ConfigError(f"expand cannot shrink {name} ({old} -> {new!r}): give a larger size or leave it unset")
    if new % old:
        raise ConfigError(f"{name} can only grow by a whole factor ({old} -> {2 * old}, {3 * old}, ...), not to "
                          f"{new}: a LayerNorm over the wider vector keeps the old statistics only when every unit "
                          "is repeated the same number of times")
    return new // old


def _rep(t: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Producer side: t tiled k times along dim."""
    return t if k == 1 else torch.cat([t] * k, dim)


def _shares(shape, k: int, gen: torch.Generator, dtype) -> torch.Tensor:
    """(k, *shape) random positive shares in (1/3k, 3/k) summing to 1 over the first dim."""
    u = torch.rand((k, *shape), generator=gen, dtype=torch.float64) + 0.5
    return (u / u.sum(0)).to(dtype)


def _cols(w: torch.Tensor, blocks: list[tuple[int, int]], gen: torch.Generator) -> torch.Tensor:
    """Consumer side: the column blocks (width, k) of w (out, in), each split into k shared copies."""
    parts, start = [], 0
    for width, k in blocks:
        part = w[:, start:start + width]
        start += width
        if k > 1:
            f = _shares(part.shape, k, gen, part.dtype)
            part = torch.cat([part * f[r] for r in range(k)], 1)
        parts.append(part)
    if start != w.shape[1]:
        raise ValueError(f"column blocks cover {start} of {w.shape[1]} columns")
    return torch.cat(parts, 1)


def _linear(w: torch.Tensor, k_out: int, blocks: list[tuple[int, int]], gen: torch.Generator) -> torch.Tensor:
    return _cols(_rep(w, 0, k_out), blocks, gen)


def _cell(src: dict, fresh: dict, p: str, H: int, k: int, gen: torch.Generator) -> dict:
    """The parameters of an RWKV cell of width H grown to k H (prefix p, e.g. "manager.")."""
    out = {p + n: _rep(src[p + n], 0, k) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                                                   "time_decay", "time_first")}
    out.update({p + n: _rep(src[p + n], 1, k) for n in ("mix", "mix_cm")})
    for n in ("key", "value", "receptance", "output", "receptance_cm"):
        out[f"{p}{n}.weight"] = _linear(src[f"{p}{n}.weight"], k, [(H, k)], gen)
    old_hidden = FFN_MULT * H
    key_cm = _cols(src[f"{p}key_cm.weight"], [(H, k)], gen)  # (4H, kH): the old hidden units
    out[f"{p}key_cm.weight"] = torch.cat([key_cm, fresh[f"{p}key_cm.weight"][old_hidden:]], 0)
    value_cm = _rep(src[f"{p}value_cm.weight"], 0, k)  # (kH, 4H); fresh hidden units write nothing
    out[f"{p}value_cm.weight"] = torch.cat([value_cm, value_cm.new_zeros(k * H, (k - 1) * old_hidden)], 1)
    return out


def expanded_config(config: HierarchosConfig, context_dim: int | None = None, h_hidden: int | None = None,
                    l_hidden: int | None = None, ltm_slots: int | None = None,
                    max_length: int | None = None) -> tuple[HierarchosConfig, dict[str, int]]:
    """The grown config and the factor of each growable size; ConfigError for what cannot grow."""
    if ltm_slots is not None and ltm_slots != config.ltm_slots:
        raise ConfigError(f"ltm_slots cannot change ({config.ltm_slots} -> {ltm_slots}) without changing the "
                          "model's function: the top-k memory read would rank the new slots among the old ones. "
                          "Grow context_dim, h_hidden, l_hidden or max_length")
    sizes = {"context_dim": context_dim, "h_hidden": h_hidden, "l_hidden": l_hidden}
    k = {name: _factor(name, getattr(config, name), new) for name, new in sizes.items()}
    changes = {name: getattr(config, name) * k[name] for name in GROWABLE}
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ConfigError(f"max_length must be a positive number of tokens, got {max_length!r}")
        changes["n_ctx"] = max_length
    kc = k["context_dim"]
    changes["commitment_threshold"] = config.commitment_threshold * kc
    changes["commitment_loss_weight"] = config.commitment_loss_weight / kc
    return config.replace(**changes), k


def expand(model: Hierarchos, context_dim: int | None = None, h_hidden: int | None = None,
           l_hidden: int | None = None, ltm_slots: int | None = None, max_length: int | None = None,
           seed: int = 0) -> Hierarchos:
    """A new Hierarchos with the given larger sizes whose logits equal ``model``'s on every input
    (see the module docstring for the rule and what cannot grow). ``seed``: the random shares and
    the fresh channel-mixing units. The result has the same dtype, device, mode and tokenizer."""
    from hiermem.models.lora import LoraAdapted

    if not isinstance(model, Hierarchos):
        raise ConfigError(f"expand works on hierarchos models, not {type(model).__name__}")
    if isinstance(model, LoraAdapted):
        raise ConfigError("the model carries LoRA adapters: merge them first (hiermem merge-lora), then expand")
    config, k = expanded_config(model.config, context_dim, h_hidden, l_hidden, ltm_slots, max_length)
    c = model.config
    C, P, Hh, Hl, KV = c.context_dim, c.persistent_dim, c.h_hidden, c.l_hidden, c.ltm_topk * c.ltm_val_dim
    kc, kh, kl = k["context_dim"], k["h_hidden"], k["l_hidden"]
    first = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        big = Hierarchos(config).to(device=first.device, dtype=first.dtype)
    gen = torch.Generator().manual_seed(seed)
    src = {n: t.detach().to("cpu") for n, t in model.state_dict().items()}
    fresh = {n: t.detach().to("cpu") for n, t in big.state_dict().items()}
    new = {n: src[n] for n in ("persistent", "ltm.keys", "ltm.vals", "ltm.gate_logit")}
    new["tok_emb.weight"] = _rep(src["tok_emb.weight"], 1, kc)
    new["qproj.weight"] = _cols(src["qproj.weight"], [(C, kc), (C, kc)], gen)
    new["val_proj.weight"] = _cols(src["val_proj.weight"], [(C, kc)], gen)
    new["in_proj.weight"] = _linear(src["in_proj.weight"], kc, [(C, kc), (P, 1), (KV, 1)], gen)
    new["h_in_proj.weight"] = _linear(src["h_in_proj.weight"], kh, [(C, kc)], gen)
    new["l_feedback_proj.weight"] = _linear(src["l_feedback_proj.weight"], kh, [(Hl, kl)], gen)
    new["h_to_context.weight"] = _linear(src["h_to_context.weight"], kc, [(Hh, kh)], gen)
    new["h_halt_proj.weight"] = _cols(src["h_halt_proj.weight"], [(Hh, kh)], gen)
    new["h_halt_proj.bias"] = src["h_halt_proj.bias"]
    new["l_input_proj.weight"] = _linear(src["l_input_proj.weight"], kl, [(C, kc), (C, kc)], gen)
    new["context_drift_proj.weight"] = _linear(src["context_drift_proj.weight"], kc, [(Hl, kl)], gen)
    new["l_to_out.weight"] = _linear(src["l_to_out.weight"], kc, [(Hl, kl)], gen)
    for name, kk in (("in_proj", kc), ("h_in_proj", kh), ("h_to_context", kc), ("l_input_proj", kl),
                     ("l_to_out", kc)):
        new[f"{name}.bias"] = _rep(src[f"{name}.bias"], 0, kk)
    new.update(_cell(src, fresh, "manager.", Hh, kh, gen))
    new.update(_cell(src, fresh, "worker.", Hl, kl, gen))
    gain, bias = src["out_norm.weight"], src["out_norm.bias"]
    if c.tie_embeddings:  # the head reads repeated embedding columns: the norm's outputs take the shares
        f = _shares(gain.shape, kc, gen, gain.dtype)
        new["out_norm.weight"] = torch.cat([gain * f[r] for r in range(kc)])
        new["out_norm.bias"] = torch.cat([bias * f[r] for r in range(kc)])
    else:
        new["out_norm.weight"], new["out_norm.bias"] = _rep(gain, 0, kc), _rep(bias, 0, kc)
        new["head"] = _cols(src["head"], [(C, kc)], gen)
    missing = sorted(set(fresh) ^ set(new))
    if missing:
        raise RuntimeError(f"expand does not map {missing}: update it with the model")
    big.load_state_dict({n: t.to(fresh[n].dtype) for n, t in new.items()})
    big.tokenizer = model.tokenizer
    return big.train(model.training)


def expand_state(state: HierarchosState, small: HierarchosConfig, big: HierarchosConfig) -> HierarchosState:
    """A state of the ``small`` model carried over to its expansion ``big`` (units repeated the same way)."""
    k = {name: getattr(big, name) // getattr(small, name) for name in GROWABLE}
    kc, kh, kl = k["context_dim"], k["h_hidden"], k["l_hidden"]
    return HierarchosState(
        manager=_rep(state.manager, 2, kh), worker=_rep(state.worker, 2, kl),
        worker_out=_rep(state.worker_out, 1, kl), prev_context=_rep(state.prev_context, 1, kc),
        target_context=_rep(state.target_context, 1, kc), ltm_fast=state.ltm_fast, ltm_mom=state.ltm_mom,
        ltm_time=state.ltm_time, clock=state.clock, tokens=state.tokens,
        ltm_lr=state.ltm_lr, ltm_steps=state.ltm_steps)


def expand_command(model: str | None = None, output: str | None = None, context_dim: int | None = None,
                   h_hidden: int | None = None, l_hidden: int | None = None, max_length: int | None = None,
                   seed: int = 0) -> int:
    """Grow a trained Hierarchos into a larger one that starts from exactly its function (equal
    logits): context_dim, h_hidden and l_hidden grow by whole factors (each unit repeated, LayerNorm
    statistics kept), max_length sets the training window n_ctx. ltm_slots cannot grow this way.
    Train it further with hiermem finetune --model OUTPUT --lora-r 0 (every weight), or load it anywhere.

    Args:
        model: the trained hierarchos model folder (required)
        output: folder for the expanded model (required)
        context_dim: new context width C (a multiple of the old one)
        h_hidden: new manager width (a multiple of the old one)
        l_hidden: new worker width (a multiple of the old one)
        max_length: new training window n_ctx in tokens
        seed: random seed of the weight shares and the fresh channel-mixing units
    """
    from hiermem.models import load_model

    if not model or not output:
        raise ConfigError("expand needs --model FOLDER and --output DIR")
    small = load_model(model)
    if small.config.model_type != "hierarchos":
        raise ConfigError(f"expand grows hierarchos models; {model} holds a {small.config.model_type}")
    big = expand(small, context_dim=context_dim, h_hidden=h_hidden, l_hidden=l_hidden, max_length=max_length,
                 seed=seed)
    big.save_pretrained(output)
    n_small, n_big = (sum(p.numel() for p in m.parameters()) for m in (small, big))
    print(f"expanded {model} ({n_small:,} parameters) to {output} ({n_big:,} parameters; "
          f"context_dim {big.config.context_dim}, h_hidden {big.config.h_hidden}, l_hidden {big.config.l_hidden}, "
          f"n_ctx {big.config.n_ctx})")
    return 0
