"""LoRA adapters (PEFT) for every from-scratch model family, an optional trainable tail of the base
parameters ("unlock"), adapter-only saving, and merging back into plain weights.

:func:`add_lora` injects PEFT LoRA layers in place of ``nn.Linear`` modules (default: every Linear
whose weight is not tied to another parameter) and turns the model into its adapted class: it
trains, and ``save_pretrained`` writes, only the adapters and the unlocked base parameters.
A layer's adapted weight is W + (alpha / r) B A; models that read a Linear's weight directly (fused
matmuls) go through :func:`linear_weight` so the adapter acts there too. A probe forward/backward
checks that every adapter acts: default targets on which it does not are dropped (logged), given
targets are an error.

Unlock rule: walking the base parameters from the last registered one backwards, whole tensors are
made trainable until they hold at least ``unlock_percent`` % of the base's elements (0: none,
100: all). Tied tensors count once.

Adapter folder (``save_pretrained`` of an adapted model)::

    adapter_config.json         base folder, base weights digest, r, alpha, targets, unlocked names
    adapter_model.safetensors   the LoRA factors A (r, in) and B (out, r) and the unlocked tensors

:func:`merge_lora` rebuilds base + adapters and folds them into plain weights (PEFT ``merge``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import atomic_write_json, load_tensors, read_json, save_tensors
from hiermem.models.base import copy_checked, weights_digest

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "hiermem-lora-1"
ADAPTER = "default"  # PEFT's adapter name


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight (out, in) a Linear applies: its own, plus the delta of an active unmerged LoRA
    adapter when PEFT replaced it by a LoRA layer (differentiable)."""
    base = getattr(layer, "base_layer", None)
    if base is None:
        return layer.weight
    w = base.weight
    if layer.merged or layer.disable_adapters:
        return w
    for name in layer.active_adapters:
        if name in layer.lora_A:
            w = w + layer.get_delta_weight(name).to(w.dtype)
    return w


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _plain_linears(model: nn.Module) -> list[str]:
    """Names of the Linear modules whose weight no other parameter shares."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and count[id(m.weight)] == 1]


def unlocked_tail(model: nn.Module, percent: float) -> list[str]:
    """The base parameters the unlock rule (module docstring) makes trainable, in model order."""
    params = [(n, p.numel()) for n, p in model.named_parameters() if not _is_lora(n)]
    goal, taken, out = percent / 100.0 * sum(k for _, k in params), 0, []
    for name, size in reversed(params):
        if taken >= goal or percent <= 0:
            break
        out.append(name)
        taken += size
    return out[::-1]


class LoraAdapted:
    """Mixin of an adapted model's class: trains and saves adapters (+ unlocked tensors) only.

    ``lora``: the adapter record written to adapter_config.json."""

    lora: dict

    def trainable_names(self, mode: str = "default") -> list[str]:
        """"lora" / "default": the LoRA factors and the unlocked base tensors; "full": everything."""
        names = [n for n, _ in self.named_parameters()]
        if mode == "full":
            return names
        if mode not in ("default", "lora"):
            raise ConfigError(f"a model with LoRA adapters trains 'lora' (or 'default') or 'full', not {mode!r}")
        unlocked = set(self.lora["unlocked"])
        return [n for n in names if _is_lora(n) or n in unlocked]

    def save_pretrained(self, folder: str | Path) -> None:
        """Write adapter_config.json and adapter_model.safetensors (no base weights) into ``folder``."""
        folder = Path(folder)
        params = dict(self.named_parameters())
        tensors = {n: params[n].detach().contiguous() for n in self.trainable_names("lora")}
        save_tensors(folder / ADAPTER_WEIGHTS, tensors, {"format": FORMAT})
        atomic_write_json(folder / ADAPTER_CONFIG, {**self.lora, "config": self.config.to_dict()})


_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoraAdapted, cls), {"plain_class": cls})
    return _CLASSES[cls]


def _unwrap(model: nn.Module, name: str, merge: bool) -> None:
    """Replace the LoRA layer ``name`` by its base Linear (after folding the adapter in with ``merge``)."""
    layer = model.get_submodule(name)
    if merge:
        layer.merge()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())


def _probe_live(model: nn.Module, targets: list[str]) -> set[str]:
    """Targets whose LoRA factor B gets a gradient from one forward/backward on a short input."""
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = (torch.arange(8, device=model.device) * 7 + 3).remainder(vocab)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(ids, labels=ids)
            loss = out.loss + sum(v.float() for v in (out.aux or {}).values())
            loss.backward()
    finally:
        model.train(was_training)
    live = set()
    for name in targets:
        grad = model.get_submodule(name).lora_B[ADAPTER].weight.grad
        if grad is not None and bool(grad.abs().sum() > 0):
            live.add(name)
    for p in model.parameters():
        p.grad = None
    return live


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, targets: list[str] | None = None,
             unlock_percent: float = 0.0, base_folder: str | Path | None = None, probe: bool = True) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and return it as an adapted model.

    r, alpha: rank and scale (delta = alpha / r * B A; B starts at zero, so the function is unchanged).
    targets: Linear module names (default: every untied Linear). unlock_percent: base tensors also
    trained (module docstring). base_folder: recorded so the adapters can be merged later.
    probe: check with a forward/backward that each adapter acts (see the module docstring).
    """
    from hiermem.models import model_spec

    if isinstance(model, LoraAdapted):
        raise ConfigError("the model already has LoRA adapters; merge them first (hiermem merge-lora)")
    spec = model_spec(model.config.model_type)
    if spec.pretrained_backbone:
        raise ConfigError(f"{spec.model_type} has its own LoRA on the backbone: use hiermem train "
                          f"{spec.model_type} --trainable lora")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"lora r must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"lora alpha must be > 0, got {alpha!r}")
    if not isinstance(unlock_percent, (int, float)) or not 0 <= unlock_percent <= 100:
        raise ConfigError(f"unlock percent must be in [0, 100], got {unlock_percent!r}")
    candidates = _plain_linears(model)
    given = bool(targets)
    chosen = list(targets) if given else candidates
    unknown = sorted(set(chosen) - set(candidates))
    if unknown:
        raise ConfigError(f"LoRA targets {unknown} are not untied Linear modules of this "
                          f"{spec.model_type}; choose among {candidates}")
    if not chosen:
        raise ConfigError(f"this {spec.model_type} has no untied Linear module to adapt (fine-tune every "
                          "weight instead: hiermem finetune --lora-r 0)")
    digest = weights_digest(model)
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=chosen), model)
    if probe:
        dead = [n for n in chosen if n not in _probe_live(model, chosen)]
        if dead and given:
            for name in chosen:
                _unwrap(model, name, merge=False)
            for p in model.parameters():
                p.requires_grad_(True)
            raise ConfigError(f"LoRA on {dead} would not act: the model does not apply those layers' weights "
                              "(through their forward or linear_weight) on a probe input")
        for name in dead:
            _unwrap(model, name, merge=False)
        if dead:
            log.info("no LoRA on %s: the model does not apply those weights through the layer", dead)
        chosen = [n for n in chosen if n not in dead]
    model.__class__ = _adapted_class(type(model))
    model.lora = {"format": FORMAT, "model_type": spec.model_type, "r": r, "alpha": alpha, "targets": chosen,
                  "unlock_percent": float(unlock_percent), "unlocked": [],
                  "base_model": str(Path(base_folder).resolve()) if base_folder else None, "base_digest": digest}
    model.lora["unlocked"] = unlocked_tail(model, unlock_percent)
    trainable = set(model.trainable_names("lora"))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


def read_adapter_config(folder: str | Path) -> dict:
    """The adapter record of ``folder``; CheckpointError when it holds no adapters of this format."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{folder} holds no {ADAPTER_CONFIG}: not a LoRA adapter folder (hiermem finetune "
                              "writes one to <output>/final)")
    record = read_json(folder / ADAPTER_CONFIG)
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not a {FORMAT} adapter record")
    return record


def load_adapted(folder: str | Path, base: str | Path | None = None, device=None) -> nn.Module:
    """The base model (``base``, default: the folder recorded with the adapters) with the adapters
    of ``folder`` loaded. CheckpointError when the base is not the one they were trained on."""
    from hiermem.models import load_model

    folder = Path(folder)
    record = read_adapter_config(folder)
    base = base or record.get("base_model")
    if not base:
        raise CheckpointError(f"{folder} records no base model folder: pass the base model explicitly")
    model = load_model(base, device=device)
    if model.config.model_type != record["model_type"] or weights_digest(model) != record["base_digest"]:
        raise CheckpointError(f"the adapters in {folder} were trained on another base model than {base} "
                              f"({record['model_type']} with weights digest {record['base_digest'][:12]}...)")
    model = add_lora(model, r=record["r"], alpha=record["alpha"], targets=record["targets"],
                     unlock_percent=record["unlock_percent"], base_folder=base, probe=False)
    tensors, _ = load_tensors(folder / ADAPTER_WEIGHTS, model.device)
    params = dict(model.named_parameters())
    copy_checked({n: params[n] for n in model.trainable_names("lora")}, tensors, folder / ADAPTER_WEIGHTS,
                 "adapter record", hint="adapters saved with another record?")
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters of an adapted model into its Linear weights, in place: the plain model
    (same class as before :func:`add_lora`, every parameter trainable)."""
    if not isinstance(model, LoraAdapted):
        raise ConfigError("the model has no LoRA adapters to merge")
    with torch.no_grad():
        for name in model.lora["targets"]:
            _unwrap(model, name, merge=True)
    model.__class__ = model.plain_class
    del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_lora(folder: str | Path, base: str | Path | None = None, out: str | Path | None = None) -> nn.Module:
    """Base model + the adapters of ``folder`` folded into plain weights; saved to ``out`` when
    given (config, weights and tokenizer: a folder every command loads)."""
    model = merge_adapters(load_adapted(folder, base))
    if out is not None:
        model.save_pretrained(out)
    return model
