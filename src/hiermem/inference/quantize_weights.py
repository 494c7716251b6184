"""Weight-only quantization of the from-scratch model families (transformer, hrmlm, hierarchos, hmst).

Formats (groups of ``GROUP`` = 32 consecutive weights along the input, i.e. last, dimension; one
fp16 scale per group, rounded up so no value leaves the integer range):

    q8_0   int8 q in [-127, 127], w ~ s q,  s = max|w| / 127           8.5 bits per weight
    q4_0   4-bit q in [-7, 7] (stored q + 8, two per uint8), s = max|w| / 7   4.5 bits per weight
    int4   4-bit q in [0, 15] with a per-group minimum m (fp16), w ~ m + s q, s = (max - min) / 15
                                                                       5 bits per weight
    q2_k   llama.cpp's 2-bit k-quant layout: super-blocks of 256 weights, each 16 sub-blocks of 16;
           q in [0, 3] (four per uint8), w ~ d sc q - dmin m with 4-bit sub-block codes sc, m and
           fp16 super-block scales d, dmin                             2.625 bits per weight
           (only weights with >= 256 inputs; the others stay in float)

The error of every weight is at most half its group's step s (``int4``: half a step plus the
rounding of m to fp16; ``q2_k``: half a step d sc plus the rounding of the sub-block minimum to
the code m).

How a model keeps working unchanged: each chosen weight Parameter (an ``nn.Linear``'s ``weight``,
a GRU cell's ``weight_ih``/``weight_hh``, MoE expert stacks ``w_in``/``w_out``; with ``include_head``,
the command's default, also embedding tables and output heads) is removed from its module and replaced by a
:class:`QuantizedWeight` child (packed integers and scales as buffers) under ``<name>_quant``; the
module's class is swapped for a subclass with a read-only property ``<name>`` returning the
dequantized float tensor. ``layer.weight``, ``linear_weight(layer)``, ``F.linear(x, self.head)``
and ``nn.Linear.forward`` all read that property, so no family needs its own code. Dequantization
happens once per model call by default (only the packed form stays in memory between calls), on
every read, or once for good (fp32 speed, the disk saving only): :func:`set_dequant_mode`. Quantized models are for
inference: the dequantized weights have no gradient.

Folder (no pickle)::

    config.json, tokenizer/        as save_pretrained writes them
    quantization.json              scheme, format, group size, quantized weights, include_head, source
    quantized.safetensors          packed ints + scales of the quantized weights, every other tensor
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import atomic_write_json, load_tensors, read_json, save_tensors

SCHEME = "weight-only-grouped"
MARKER = "quantization.json"
WEIGHTS = "quantized.safetensors"
GROUP = 32
MIN_SCALE = 2.0 ** -14  # fp16's smallest normal: the step of all-zero or tiny groups
FORMATS = ("q8_0", "q4_0", "int4", "q2_k")
DEQUANT_MODES = ("read", "forward", "resident")
BITS = {"q8_0": 8, "q4_0": 4, "int4": 4, "q2_k": 2}
SUPER, SUB = 256, 16  # q2_k: weights per super-block and per sub-block
SUFFIX = "_quant"
HEAD_NAMES = ("head", "lm_head", "embed_out")  # module/parameter names of output heads
MATRIX_PREFIXES = ("weight", "w_")  # parameter names read as matrices (Linear, GRU cells, MoE experts)


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown weight format {fmt!r}; choose among {', '.join(FORMATS)}")
    return fmt


def _round_up_half(x: torch.Tensor) -> torch.Tensor:
    """x (float32, >= 2^-14, fp16's smallest normal) as fp16, never below x (so |w| / s stays within
    the integer range): where nearest rounding went down, x (1 + 2^-10) rounds to a value above x."""
    h = x.to(torch.float16)
    h = torch.where(h.float() < x, (x * (1 + 2 ** -10)).to(torch.float16), h)
    if not bool(torch.isfinite(h).all()):
        raise ConfigError("a weight group is too large for fp16 scales (|w| > 1e5)")
    return h


def quantize_tensor(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Quantize w (..., n) in groups of GROUP along its last dimension (zero-padded to a multiple).

    Returns "packed" (..., G * 32) int8 for q8_0 or (..., G * 16) uint8 for 4-bit formats (element
    2j in the low nibble, 2j + 1 in the high one), "scales" (..., G) fp16 and, for int4, "mins" (..., G) fp16.
    """
    _check_format(fmt)
    if fmt == "q2_k":
        return _quantize_q2k(w)
    n = w.shape[-1]
    G = -(-n // GROUP)
    x = torch.nn.functional.pad(w.detach().float(), (0, G * GROUP - n)).reshape(*w.shape[:-1], G, GROUP)
    out = {}
    if fmt == "int4":
        lo, hi = x.amin(-1), x.amax(-1)
        mins = lo.to(torch.float16)
        mins = torch.where(mins.float() > lo, (lo - lo.abs() * 2 ** -10).to(torch.float16), mins)  # m <= min
        scales = _round_up_half(((hi - mins.float()) / 15).clamp(min=MIN_SCALE))
        q = ((x - mins.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
        out["mins"] = mins
    else:
        top = 127 if fmt == "q8_0" else 7
        scales = _round_up_half((x.abs().amax(-1) / top).clamp(min=MIN_SCALE))
        q = (x / scales.float()[..., None]).round().clamp(-top, top)
        q = q.to(torch.int8) if fmt == "q8_0" else (q + 8).to(torch.uint8)
    if BITS[fmt] == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # (..., G, 16)
    out["packed"] = q.flatten(-2).contiguous()
    out["scales"] = scales
    return out


def _quantize_q2k(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """q2_k of w (..., n), zero-padded to whole super-blocks: "packed" (..., S * 64) uint8 (element
    4j + i in bits 2i..2i+1 of byte j), "scales" (..., S * 16) uint8 (sc | m << 4 per sub-block),
    "super" (..., S, 2) fp16 (d, dmin)."""
    n = w.shape[-1]
    S = -(-n // SUPER)
    x = torch.nn.functional.pad(w.detach().float(), (0, S * SUPER - n)).reshape(*w.shape[:-1], S, SUPER // SUB, SUB)
    lo = x.amin(-1).clamp(max=0.0)  # (..., S, 16): sub-block minimum, never above 0
    step = ((x.amax(-1) - lo) / 3).clamp(min=MIN_SCALE)  # the sub-block's float step
    d = _round_up_half((step.amax(-1) / 15).clamp(min=MIN_SCALE))  # (..., S)
    dmin = _round_up_half(((-lo).amax(-1) / 15).clamp(min=MIN_SCALE))
    sc = (step / d.float()[..., None]).ceil().clamp(1, 15)  # rounded up: the codes' range still covers the block
    m = (-lo / dmin.float()[..., None]).round().clamp(0, 15)
    q = ((x + (dmin.float()[..., None] * m)[..., None]) / (d.float()[..., None] * sc)[..., None])
    q = q.round().clamp(0, 3).to(torch.uint8).flatten(-3)  # (..., S * 256)
    q = q.view(*q.shape[:-1], -1, 4)
    packed = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    codes = (sc.to(torch.uint8) | (m.to(torch.uint8) << 4)).flatten(-2)
    return {"packed": packed.contiguous(), "scales": codes.contiguous(), "super": torch.stack([d, dmin], -1)}


def _dequantize_q2k(packed: torch.Tensor, codes: torch.Tensor, sup: torch.Tensor, n: int, dtype) -> torch.Tensor:
    S = sup.shape[-2]
    q = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], -1).view(*packed.shape[:-1], S, SUPER // SUB, SUB)
    sc, m = (codes & 0x0F).to(dtype), (codes >> 4).to(dtype)
    sc, m = sc.view(*codes.shape[:-1], S, SUPER // SUB), m.view(*codes.shape[:-1], S, SUPER // SUB)
    d, dmin = sup[..., 0].to(dtype)[..., None], sup[..., 1].to(dtype)[..., None]
    w = q.to(dtype) * (d * sc)[..., None] - (dmin * m)[..., None]
    return w.flatten(-3)[..., :n]


def dequantize_tensor(packed: torch.Tensor, scales: torch.Tensor, fmt: str, n: int,
                      mins: torch.Tensor | None = None, dtype=torch.float32, sup: torch.Tensor | None = None) -> torch.Tensor:
    """The float tensor (..., n) of :func:`quantize_tensor`'s output (padding dropped; ``sup``: q2_k's "super")."""
    if fmt == "q2_k":
        return _dequantize_q2k(packed, scales, sup, n, dtype)
    G = scales.shape[-1]
    if BITS[fmt] == 4:
        q = torch.stack([packed & 0x0F, packed >> 4], -1).view(*packed.shape[:-1], G, GROUP)
        q = q.to(dtype) if fmt == "int4" else q.to(dtype) - 8
    else:
        q = packed.view(*packed.shape[:-1], G, GROUP).to(dtype)
    w = q * scales.to(dtype)[..., None]
    if mins is not None:
        w = w + mins.to(dtype)[..., None]
    return w.flatten(-2)[..., :n]


class QuantizedWeight(nn.Module):
    """A weight of shape ``shape`` (..., n) held as packed integers + per-group scales (buffers).
    Calling it returns the float tensor; with ``cache`` it is dequantized once and kept."""

    def __init__(self, shape: tuple[int, ...], fmt: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt, self.shape, self.dtype, self.cache = _check_format(fmt), tuple(shape), dtype, False
        *lead, n = self.shape
        G = -(-n // GROUP)
        if fmt == "q2_k":
            S = -(-n // SUPER)
            self.register_buffer("packed", torch.zeros(*lead, S * SUPER // 4, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(*lead, S * SUPER // SUB, dtype=torch.uint8))
            self.register_buffer("super", torch.zeros(*lead, S, 2, dtype=torch.float16))
        else:
            width = G * GROUP if BITS[fmt] == 8 else G * GROUP // 2
            self.register_buffer("packed", torch.zeros(*lead, width, dtype=torch.int8 if fmt == "q8_0" else torch.uint8))
            self.register_buffer("scales", torch.zeros(*lead, G, dtype=torch.float16))
            self.register_buffer("super", None)
        self.register_buffer("mins", torch.zeros(*lead, G, dtype=torch.float16) if fmt == "int4" else None)
        self.register_buffer("dequantized", None, persistent=False)

    @classmethod
    def from_tensor(cls, w: torch.Tensor, fmt: str) -> QuantizedWeight:
        holder = cls(tuple(w.shape), fmt, w.dtype)
        for k, v in quantize_tensor(w, fmt).items():
            setattr(holder, k, v.to(w.device))
        return holder

    def forward(self) -> torch.Tensor:
        if self.dequantized is not None:
            return self.dequantized
        w = dequantize_tensor(self.packed, self.scales, self.fmt, self.shape[-1], self.mins, self.dtype, self.super)
        if self.cache:
            self.dequantized = w
        return w

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "dequantized")

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={self.shape}, group={SUPER if self.fmt == 'q2_k' else GROUP}"


_CLASSES: dict[tuple[type, frozenset], type] = {}


def _property(name: str) -> property:
    def get(self):
        return self._modules[name + SUFFIX]()

    return property(get, doc=f"{name}, dequantized from {name}{SUFFIX}")


def _quantized_class(cls: type, names: frozenset) -> type:
    """``cls`` with read-only properties for the quantized weights ``names`` (cached per class)."""
    key = (cls, names)
    if key not in _CLASSES:
        attrs = {n: _property(n) for n in names}
        _CLASSES[key] = type(f"Quantized{cls.__name__}", (cls,), {**attrs, "plain_class": cls,
                                                                 "quantized_names": names})
    return _CLASSES[key]


def _install(owner: nn.Module, leaf: str, holder: QuantizedWeight) -> None:
    """Replace the parameter ``owner.<leaf>`` by ``holder`` (read back through a property)."""
    owner._parameters.pop(leaf, None)
    owner.add_module(leaf + SUFFIX, holder)
    plain = getattr(type(owner), "plain_class", type(owner))
    names = frozenset(getattr(type(owner), "quantized_names", frozenset()) | {leaf})
    owner.__class__ = _quantized_class(plain, names)


def is_head(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is an embedding table or an output head (``include_head`` decides)."""
    owner_name = name.rpartition(".")[0]
    owner = model.get_submodule(owner_name) if owner_name else model
    parts = name.split(".")
    return isinstance(owner, nn.Embedding) or any(p in HEAD_NAMES or p.endswith("_head") for p in parts)


def _tied_places(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is reachable under (tied weights have several)."""
    places: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        places.setdefault(id(p), []).append(n)
    return places


def select_weights(model: nn.Module, include_head: bool = False, fmt: str = "q8_0") -> list[str]:
    """Names (first name of tied ones) of the floating parameters to quantize: those named
    ``weight*`` / ``w_*`` with 2+ dimensions and at least GROUP inputs (q2_k: SUPER) outside norm
    layers, plus embedding tables and heads with ``include_head``; a parameter tied to a head counts
    as a head."""
    least = SUPER if fmt == "q2_k" else GROUP
    places = _tied_places(model)
    out = []
    for n, p in model.named_parameters():
        owner_name, _, leaf = n.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        head = any(is_head(model, m) for m in places[id(p)])
        matrix = (isinstance(owner, (nn.Linear, nn.Embedding)) or leaf.startswith(MATRIX_PREFIXES)
                  or (owner is model and leaf in HEAD_NAMES))
        norm = "norm" in type(owner).__name__.lower() or "norm" in leaf
        if (p.is_floating_point() and p.dim() >= 2 and p.shape[-1] >= least and matrix and not norm
                and (include_head or not head)):
            out.append(n)
    return out


def quantize_model(model: nn.Module, fmt: str, include_head: bool = False, names: list[str] | None = None,
                   empty: bool = False) -> list[str]:
    """Quantize ``model``'s weights ``names`` (default :func:`select_weights`) in place; tied
    places share one holder. ``empty``: install zero holders (to load stored ones into). Returns names."""
    _check_format(fmt)
    names = select_weights(model, include_head, fmt) if names is None else list(names)
    params, places = dict(model.named_parameters()), _tied_places(model)
    for name in names:
        if name not in params:
            raise CheckpointError(f"{type(model).__name__} has no weight {name!r} to quantize")
        p = params[name]
        holder = QuantizedWeight(tuple(p.shape), fmt, p.dtype) if empty else QuantizedWeight.from_tensor(p, fmt)
        for place in places[id(p)]:
            owner_name, _, leaf = place.rpartition(".")
            _install(model.get_submodule(owner_name) if owner_name else model, leaf, holder)
    set_dequant_mode(model, getattr(model, "dequant_mode", "forward"))
    return names


def set_dequant_mode(model: nn.Module, mode: str = "forward") -> nn.Module:
    """When quantized weights are dequantized: "read" (on every read of the weight), "forward"
    (once per call of the model or of one of its direct children, e.g. a decoder calling the inner
    network; freed when the outermost call returns), "resident" (once, kept in float)."""
    if mode not in DEQUANT_MODES:
        raise ConfigError(f"dequantization mode must be one of {', '.join(DEQUANT_MODES)}, got {mode!r}")
    holders = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    for h in holders:
        h.cache, h.dequantized = mode != "read", None
    for handle in model.__dict__.pop("_dequant_hooks", ()):
        handle.remove()
    if mode == "forward" and holders:
        depth = [0]

        def enter(*_):
            depth[0] += 1

        def leave(*_):
            depth[0] -= 1
            if depth[0] <= 0:
                depth[0] = 0
                for h in holders:
                    h.dequantized = None

        roots = [model, *model.children()]
        model.__dict__["_dequant_hooks"] = [
            *(m.register_forward_pre_hook(enter) for m in roots),
            *(m.register_forward_hook(leave, always_call=True) for m in roots)]
    model.__dict__["dequant_mode"] = mode
    return model


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of ``model``, shared ones once (the first name)."""
    keys = set(model.state_dict())
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: t.detach() for n, t in named if n in keys}


def save_weight_quantized(model: nn.Module, folder: str | Path, fmt: str, names: list[str],
                          include_head: bool, source: str | None = None) -> Path:
    """Write a model quantized by :func:`quantize_model` (config, tokenizer, tensors, record)."""
    from hiermem.models.base import CONFIG_NAME, TOKENIZER_DIR
    from hiermem.tokenizers import save_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS, {k: v.contiguous() for k, v in _stored(model).items()},
                 {"kind": "hiermem-weight-only", "format": fmt})
    atomic_write_json(folder / CONFIG_NAME, model.config.to_dict())
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, folder / TOKENIZER_DIR)
    atomic_write_json(folder / MARKER, {"scheme": SCHEME, "format": fmt, "group_size": GROUP, "weights": names,
                                        "include_head": include_head, "source": source})
    return folder


def load_weight_quantized(folder: str | Path, **overrides) -> nn.Module:
    """A from-scratch model (eval mode, ``.tokenizer`` set) from a folder of :func:`save_weight_quantized`."""
    from hiermem.models import folder_model_type, model_spec
    from hiermem.models.base import TOKENIZER_DIR, copy_checked
    from hiermem.tokenizers import read_tokenizer

    folder = Path(folder)
    info = read_json(folder / MARKER)
    if info.get("scheme") != SCHEME or info.get("group_size") != GROUP or info.get("format") not in FORMATS:
        raise CheckpointError(f"{folder / MARKER}: not a {SCHEME} record of group size {GROUP} in a known format")
    spec = model_spec(folder_model_type(folder))
    if spec.pretrained_backbone:
        raise CheckpointError(f"{folder}: {spec.model_type} weights are not stored in the {SCHEME} scheme")
    cls = spec.model_class()
    model = cls(cls.read_config(folder, **overrides))
    quantize_model(model, info["format"], names=info["weights"], empty=True)
    tensors, meta = load_tensors(folder / WEIGHTS)
    if meta.get("kind") != "hiermem-weight-only":
        raise CheckpointError(f"{folder / WEIGHTS} is not a hiermem weight-only quantized file")
    copy_checked(_stored(model), tensors, folder / WEIGHTS, spec.model_type, hint="another model or other options?",
                 exact_dtype=True)
    model.tokenizer = read_tokenizer(folder / TOKENIZER_DIR)
    return model.eval()


def quantize_folder(model_spec_or_folder: str | None, output: str | Path, fmt: str,
                    include_head: bool = False) -> tuple[nn.Module, list[str], int, int]:
    """Load a from-scratch model, quantize it, save it to ``output``.
    Returns (model, names, float bytes of the quantized weights, their packed bytes)."""
    from hiermem.models import load_model

    model = load_model(model_spec_or_folder, device="cpu", dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    names = select_weights(model, include_head, fmt)
    if not names:
        need = f" (q2_k quantizes weights of >= {SUPER} inputs only)" if fmt == "q2_k" else ""
        raise ConfigError(f"this {model.config.model_type} has no weight matrix to quantize{need}")
    before = sum(params[n].numel() * params[n].element_size() for n in names)
    quantize_model(model, fmt, names=names)
    holders = {id(m): m for m in model.modules() if isinstance(m, QuantizedWeight)}
    after = sum(h.nbytes() for h in holders.values())
    save_weight_quantized(model, output, fmt, names, include_head, source=str(model_spec_or_folder))
    return model, names, before, after
