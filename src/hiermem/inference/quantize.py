"""Dynamic int8 quantization of the backbone's linear layers for CPU inference.

Weights of the backbone's ``nn.Linear`` layers (the LM head too, unless left out) become int8 with
one scale per output channel; activations are quantized on the fly, one scale per call
(``torch.ao.quantization.quantize_dynamic``, fbgemm/x86 kernels). Two measures keep the error down
(on SmolLM2, quantizing every layer as is multiplies perplexity by ~5): activation outliers are first
moved into the weights where a Llama-style block allows it (SmoothQuant, exact in float, calibrated
on a few hundred tokens of text), and the MLP output projections stay in float (``KEEP_FLOAT``):
their inputs hold token-level outliers that one 8-bit activation scale per call cannot resolve.
On torch 2.13 CPU this path runs a linear layer about 2x faster than fp32, while torchao's
``Int8DynamicActivationInt8WeightConfig``, ``Int8WeightOnlyConfig`` and ``aten._weight_int8pack_mm``
run slower than fp32 in eager mode (``benchmarks/bench_int8_backends.py``: torchao 0.18 is 2.3x slower
than torch.ao on a SmolLM2-shaped prefill and 50x slower per decode step), so the deprecated torch.ao
path stays, its warnings silenced where it is called.

A quantized model folder is self-contained and holds no pickle::

    config.json, memory.safetensors    the HMT config and memory weights (as save_pretrained writes)
    quantization.json                  scheme, source model, quantized modules
    backbone/config.json, tokenizer*   the backbone's architecture and tokenizer
    backbone/int8.safetensors          int8 weights + per-channel scales/zero points + float tensors

Loading rebuilds the backbone from its config, quantizes its structure, then loads the stored int8
weights and scales into it, so a reloaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import atomic_write_json, load_tensors, read_json, save_tensors

log = logging.getLogger(__name__)

SCHEME = "dynamic-int8-per-channel"
MARKER = "quantization.json"
WEIGHTS = "int8.safetensors"
# MLP output projections (Llama/Qwen/Gemma "down_proj", OPT/Phi "fc2") stay in float by default: their
# inputs (gated products) carry token-level outliers that per-tensor int8 activations cannot hold.
KEEP_FLOAT = ("down_proj", "fc2")
# (where a group's input is produced, the linear layers reading it) in a Llama-style block. The
# down projection's input could be smoothed through up_proj's rows too, but on SmolLM2 that makes an
# all-int8 model worse (its outliers are per token, not per channel), so it is left out.
SMOOTH_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
# default calibration text for smoothing: plain English prose (activation outlier channels are
# systematic, a few hundred tokens of ordinary text find them)
CALIBRATION_TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. The farmers "
    "gathered at the bridge to decide what could still be saved. Some wanted to move the animals to the hill at "
    "once; others argued that the water would fall by noon, as it had the year before. An old woman who had "
    "lived by the river all her life said nothing for a long time, then pointed at the birds leaving the reeds. "
    "\"They know,\" she said, and the argument ended. By evening the barns stood empty and dry on the high "
    "ground, and the village watched the brown water cover the road.\n\n"
    "In the city, meanwhile, the council met to discuss the budget for the coming year. The treasurer presented "
    "a report of forty pages, with tables of income and expenses, and proposed to raise the tax on imported "
    "goods by two percent. Questions followed: would the merchants pass the cost to their customers, and what "
    "would become of the small shops near the harbour? The debate lasted until midnight. In the end the "
    "proposal was sent back to a committee, which promised an answer within a month.\n\n"
    "Chapter 3. Functions and their arguments. A function takes zero or more arguments and returns a value. "
    "For example, the function f(x) = 2x + 1 maps 3 to 7 and 10 to 21. When a function is called with the "
    "wrong number of arguments, the program stops with an error message such as: TypeError: f() takes 1 "
    "positional argument but 2 were given. Question: what does f(0) return? Answer: 1."
)


@contextmanager
def _quiet():
    """torch.ao prints deprecation warnings on every call; they say nothing actionable here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        yield


def _dynamic_linear_cls():
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def select_layers(backbone: nn.Module, include_head: bool = True,
                  keep_float: list[str] | tuple[str, ...] = KEEP_FLOAT) -> list[str]:
    """Names of the backbone's ``nn.Linear`` layers to quantize: all but those whose name contains
    a ``keep_float`` fragment (and the LM head unless ``include_head``)."""
    head = backbone.get_output_embeddings()
    return [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)
            and (include_head or m is not head) and not any(k in n for k in keep_float)]


@torch.no_grad()
def smooth_activations(backbone: nn.Module, calibration: torch.Tensor, names: list[str], alpha: float = 0.8) -> int:
    """SmoothQuant (Xiao et al., 2023): divide each input channel of a group of linear layers by
    s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) where their input is produced (the norm before them)
    and multiply the layers' weight columns by s_j. Exact in float;
    it moves activation outliers into the per-channel weight scales, where int8 holds them.

    Applies to Llama-style blocks (``model.layers[i]`` with ``input_layernorm``,
    ``post_attention_layernorm``, q/k/v, gate/up projections) whose target layers are all in
    ``names``; other architectures are left as they are. Returns the number of groups smoothed.
    ``calibration``: token ids (1, T) the activation maxima are measured on.
    """
    layers = getattr(getattr(backbone, "model", None), "layers", None)
    if layers is None or backbone.config.model_type.startswith("gemma"):  # Gemma's norms scale by (1 + w)
        return 0
    full = {m: n for n, m in backbone.named_modules()}
    groups = []
    for layer in layers:
        mods = dict(layer.named_modules())
        for src, dsts in SMOOTH_GROUPS:
            if src in mods and all(d in mods and full[mods[d]] in names for d in dsts):
                groups.append((mods[src], [mods[d] for d in dsts]))
    if not groups:
        return 0
    amax: dict[int, torch.Tensor] = {}

    def record(module, inputs, output):
        x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()  # (in,)
        amax[id(module)] = torch.maximum(amax[id(module)], x) if id(module) in amax else x

    hooks = [dsts[0].register_forward_hook(record) for _, dsts in groups]
    try:
        backbone(calibration.to(next(backbone.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    for src, dsts in groups:
        w = torch.stack([d.weight.abs().amax(0) for d in dsts]).amax(0)  # (in,)
        scale = (amax[id(dsts[0])].clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        src.weight.div_(scale)
        if getattr(src, "bias", None) is not None:
            src.bias.div_(scale)
        for d in dsts:
            d.weight.mul_(scale)
    return len(groups)


def quantize_backbone(backbone: nn.Module, include_head: bool = True,
                      keep_float: list[str] | tuple[str, ...] = KEEP_FLOAT, names: list[str] | None = None,
                      calibration: torch.Tensor | None = None, alpha: float = 0.8) -> list[str]:
    """Quantize the backbone's linear layers in place (``names``, or :func:`select_layers`' choice);
    return the names of the layers replaced. With ``calibration`` token ids (1, T), activations are
    smoothed first (:func:`smooth_activations`)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(backbone.parameters()).device.type != "cpu":
        raise ConfigError("int8 dynamic quantization runs on CPU: load the model with --device cpu")
    names = select_layers(backbone, include_head, keep_float) if names is None else names
    if not names:
        raise ConfigError(f"no nn.Linear layer of {type(backbone).__name__} is left to quantize (GPT-2 style "
                          "Conv1D projections are not supported; check keep_float)")
    if any(p.dtype != torch.float32 for p in backbone.parameters()):
        raise ConfigError("int8 dynamic quantization starts from float32 weights: load the model with --dtype float32")
    if calibration is not None:
        smoothed = smooth_activations(backbone, calibration, names, alpha)
        log.info("smoothed the activations of %d layer groups before quantizing", smoothed)
    with _quiet():
        quantize_dynamic(backbone, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
    return names


def quantized_tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors describing a quantized backbone: int8 weights, scales, zero points, biases and
    every float parameter or buffer outside the quantized layers."""
    qlinear = _dynamic_linear_cls()
    out, inside = {}, set()
    for name, mod in backbone.named_modules():
        if isinstance(mod, qlinear):
            inside.add(name)
            w, b = mod._weight_bias()
            if w.qscheme() != torch.per_channel_affine:
                raise CheckpointError(f"{name} is not per-channel int8; quantize with hiermem's quantize_backbone")
            out[f"{name}.weight_int8"] = w.int_repr()
            out[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
            out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points()
            if b is not None:
                out[f"{name}.bias"] = b.detach()
    return {**out, **_float_tensors(backbone, inside)}


def _float_tensors(backbone: nn.Module, inside: set[str]) -> dict[str, torch.Tensor]:
    """Saved float parameters and buffers outside the quantized layers (tied weights once)."""
    keys = set(backbone.state_dict())
    named = [*backbone.named_parameters(), *backbone.named_buffers()]  # parameters deduplicated (ties)
    return {n: t.detach() for n, t in named if n in keys and not _within(n, inside)}


def _within(name: str, modules: set[str]) -> bool:
    return any(name.startswith(m + ".") for m in modules)


def load_quantized_tensors(backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load :func:`quantized_tensors` output into a backbone quantized the same way."""
    qlinear = _dynamic_linear_cls()
    used, inside = set(), set()
    with _quiet(), torch.no_grad():
        for name, mod in backbone.named_modules():
            if not isinstance(mod, qlinear):
                continue
            inside.add(name)
            try:
                q, scale, zp = (tensors[f"{name}.weight_{k}"] for k in ("int8", "scale", "zero_point"))
            except KeyError as exc:
                raise CheckpointError(f"quantized weights lack {exc}: the file belongs to another model") from exc
            weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zp, 0)
            mod.set_weight_bias(weight, tensors.get(f"{name}.bias"))
            used.update(f"{name}.{k}" for k in ("weight_int8", "weight_scale", "weight_zero_point", "bias"))
        rest = {k: v for k, v in tensors.items() if k not in used}
        expected = _float_tensors(backbone, inside)
        missing, unexpected = sorted(set(expected) - set(rest)), sorted(set(rest) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"quantized weights do not match the backbone: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")
        for name, value in rest.items():
            if expected[name].shape != value.shape:
                raise CheckpointError(f"{name} has shape {tuple(value.shape)}, the backbone expects "
                                      f"{tuple(expected[name].shape)}")
            expected[name].copy_(value)


def save_quantized(model, tokenizer, folder: str | Path, source: str | None = None) -> Path:
    """Write a quantized HMT (backbone already quantized) and its tokenizer to ``folder``."""
    folder = Path(folder)
    sub = folder / "backbone"
    sub.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    names = [n for n, m in backbone.named_modules() if isinstance(m, _dynamic_linear_cls())]
    if not names:
        raise ConfigError("the model's backbone is not quantized: call quantize_backbone first")
    model.save_pretrained(folder)
    backbone.config.save_pretrained(sub)
    if getattr(backbone, "generation_config", None) is not None:
        backbone.generation_config.save_pretrained(sub)
    tokenizer.save_pretrained(sub)
    save_tensors(sub / WEIGHTS, quantized_tensors(backbone), {"kind": "hiermem-int8", "scheme": SCHEME,
                                                             "modules": names})
    atomic_write_json(folder / MARKER, {"scheme": SCHEME, "source": source, "modules": len(names),
                                        "include_head": backbone.get_output_embeddings() is not None
                                        and any(n.endswith("lm_head") for n in names)})
    return folder


def is_quantized(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).exists()


def load_quantized(folder: str | Path, **overrides):
    """HMT with an int8 backbone on CPU (``.tokenizer`` set) from a folder written by :func:`save_quantized`,
    or a weight-only quantized from-scratch model (:mod:`hiermem.inference.quantize_weights`)."""
    from hiermem.inference import quantize_weights

    folder = Path(folder)
    info = read_json(folder / MARKER)
    if info.get("scheme") == quantize_weights.SCHEME:  # a from-scratch family, weight-only
        return quantize_weights.load_weight_quantized(folder, **overrides)
    if info.get("scheme") != SCHEME:
        raise CheckpointError(f"{folder}: unknown quantization scheme {info.get('scheme')!r} (expected {SCHEME} "
                              f"or {quantize_weights.SCHEME})")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from hiermem.backbones import freeze

    sub = folder / "backbone"
    tensors, meta = load_tensors(sub / WEIGHTS)
    if meta.get("kind") != "hiermem-int8":
        raise CheckpointError(f"{sub / WEIGHTS} is not a hiermem int8 weights file")
    try:
        config = AutoConfig.from_pretrained(str(sub))
        tokenizer = AutoTokenizer.from_pretrained(str(sub))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{sub} lacks a readable backbone config or tokenizer: {exc}") from exc
    with no_init_weights():
        backbone = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    backbone.tie_weights()  # a float head tied to the embeddings is stored once
    quantize_backbone(backbone, names=list(meta.get("modules", [])))
    load_quantized_tensors(backbone, tensors)
    backbone.eval()
    freeze(backbone)
    from hiermem.backbones import Backbone
    from hiermem.models import folder_model_type, model_spec

    spec = model_spec(folder_model_type(folder))
    bb = Backbone(model=backbone, tokenizer=tokenizer, spec=str(sub))
    return spec.model_class().from_pretrained(folder, backbone=bb, **overrides).eval()


def quantize(output: str, model: str | None = None, format: Literal["int8", "q8_0", "q4_0", "int4", "q2_k"] | None = None,
             include_head: bool = True, keep_float: list[str] | None = None, smooth: bool = True,
             alpha: float = 0.8, calibration_file: str | None = None) -> int:
    """Quantize a model for CPU inference and save it: an HMT's backbone to int8 (dynamic,
    per-channel), a from-scratch model's weights to q8_0, q4_0, int4 (weight-only, groups of 32) or q2_k.

    The folder written loads anywhere a model is taken (`hiermem generate --model FOLDER`, chat,
    serve). `benchmarks/bench_quantize.py` (HMT) and `benchmarks/bench_quantize_weights.py`
    (from-scratch) measure the speed, size and quality trade-off.

    Args:
        output: folder to write the quantized model to
        model: checkpoint folder or released weights name (default: the bundled default model)
        format: int8 (HMT checkpoints, their default); q8_0, q4_0 or int4 (from-scratch models, default
            q8_0): 8 or 4 bits per weight with one fp16 scale per 32 weights (int4 adds a per-group minimum);
            q2_k: 2.625 bits per weight in llama.cpp's k-quant layout (weights with >= 256 inputs)
        include_head: quantize the LM head too (from-scratch models: the embedding tables and output heads;
            on the released ones it costs at most 0.005 bpb more than leaving them in float and makes the
            file 2-4x smaller)
        keep_float: name fragments of linear layers left in float (default: down_proj fc2, the MLP output
            projections); give the flag with no value to quantize every linear layer
        smooth: move activation outliers into the weights first (SmoothQuant, Llama-style backbones)
        alpha: smoothing strength in [0, 1] (0: none; 1: all of an outlier moves into the weights)
        calibration_file: text to measure activations on for smoothing (default: built-in English prose)
    """
    from hiermem.inference.runtime import load_for_inference
    from hiermem.models import folder_model_type, model_folder, model_spec

    folder = model_folder(model)
    if folder is not None and is_quantized(folder):
        raise ConfigError(f"{folder} is already quantized")
    if folder is not None and not model_spec(folder_model_type(folder)).pretrained_backbone:
        return _quantize_scratch(output, model, format or "q8_0", include_head, keep_float)
    if format not in (None, "int8"):
        raise ConfigError(f"format {format} is for from-scratch models; an HMT backbone quantizes to int8 "
                          "(omit --format)")
    hmt, tokenizer = load_for_inference(model, device="cpu", dtype="float32")
    before = sum(p.numel() * p.element_size() for p in hmt.backbone.parameters())  # tied weights once
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    calibration = None
    if smooth:
        from hiermem.inference.runtime import encode

        text = CALIBRATION_TEXT
        if calibration_file is not None:
            if not Path(calibration_file).is_file():
                raise ConfigError(f"calibration file not found: {calibration_file}")
            text = Path(calibration_file).read_text(encoding="utf-8")
        calibration = encode(tokenizer, text)[:, :2048]  # (1, T)
    names = quantize_backbone(hmt.backbone, include_head=include_head,
                              keep_float=KEEP_FLOAT if keep_float is None else tuple(keep_float),
                              calibration=calibration, alpha=alpha)
    out = save_quantized(hmt, tokenizer, output, source=model or "default")
    after = (out / "backbone" / WEIGHTS).stat().st_size
    total = sum(isinstance(m, _dynamic_linear_cls()) or isinstance(m, nn.Linear) for m in hmt.backbone.modules())
    print(f"quantized {len(names)} of {total} linear layers to int8 -> {out}")
    print(f"backbone weights: {before / 2**20:.1f} MiB fp32 -> {after / 2**20:.1f} MiB int8 file")
    return 0


def _quantize_scratch(output: str, model: str, fmt: str, include_head: bool, keep_float) -> int:
    """``hiermem quantize`` for a from-scratch model (weight-only, :mod:`hiermem.inference.quantize_weights`)."""
    from hiermem.inference.quantize_weights import FORMATS, quantize_folder

    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt} is the HMT backbone's dynamic int8; a from-scratch model quantizes to "
                          f"{', '.join(FORMATS)}")
    if keep_float is not None:
        raise ConfigError("--keep-float applies to HMT backbones; from-scratch models keep embeddings and heads "
                          "in float unless --include-head")
    q, names, before, after = quantize_folder(model, output, fmt, include_head)
    size = sum(p.stat().st_size for p in Path(output).glob("*.safetensors"))
    print(f"quantized {len(names)} weights of this {q.config.model_type} to {fmt} -> {output}")
    print(f"quantized weights: {before / 2**20:.2f} MiB fp32 -> {after / 2**20:.2f} MiB {fmt}; "
          f"weights file {size / 2**20:.2f} MiB")
    return 0
