"""The model protocol: the one contract the trainer, evaluator, generator, server and quantizer use.

A hiermem model is a :class:`HiermemModel` (an ``nn.Module``) with

- ``config``: a typed dataclass with ``model_type``, ``to_dict()`` / ``from_dict()``;
- ``init_state(batch_size)`` -> a :class:`~hiermem.models.state.ModelState`;
- ``forward(input_ids, state=None, labels=None, return_logits=True, return_token_nll=False)`` ->
  :class:`ModelOutput` (mean NLL, summed NLL and token count, named auxiliary losses, optional
  logits / per-token NLL, last-position logits, the new state);
- ``decoder(state)`` -> a :class:`Decoder` for incremental generation with the same dynamics;
- ``trainable_names(mode)`` and ``parameter_groups(names, weight_decay)`` for the optimizer;
- ``aux_weights``: the weight of each auxiliary loss in the training objective;
- ``save_pretrained(folder)`` / ``from_pretrained(folder)`` writing config, safetensors weights and
  the tokenizer (``tokenizer/``), so a folder rebuilds the model alone; ``fingerprint()``.

Models with a pretrained backbone (HMT) carry it inside; from-scratch models carry their own
trained tokenizer. Either way ``model.tokenizer`` is set by the loader.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import atomic_write_json, load_tensors, read_json, save_tensors
from hiermem.models.state import ModelState, storage_nbytes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class ModelOutput:
    """What every hiermem model returns from ``forward``.

    loss: mean NLL of the scored tokens (None without labels); nll_sum, num_tokens: its parts.
    aux: named auxiliary losses (unweighted; the model's ``aux_weights`` weight them in training).
    logits (B, T, V) / token_nll (B, T-1): only when asked for; last_logits (B, V): prediction of
    the token after the input. state: the state after reading the input. hidden (B, T, d): final
    hidden states, from models that offer them when asked (HMST's ``return_hidden``).
    """

    loss: torch.Tensor | None
    state: ModelState
    nll_sum: torch.Tensor | None = None
    num_tokens: int = 0
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, l, V), targets (B, l) with -100 = ignored -> NLL (B, l) (0 where ignored), float32+."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.clamp_min(0).flatten(), reduction="none")
    return nll.view_as(targets) * (targets != -100)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state tensors: which weights
    a derived file (LoRA adapters, a learnt memory) belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def copy_checked(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where, what: str,
                 required=None, hint: str = "saved with other options?", exact_dtype: bool = False) -> None:
    """Copy ``tensors`` into the model's tensors ``own`` by name, in place; CheckpointError naming
    ``where`` when a name is unknown, one of ``required`` (default: all of ``own``) is missing, or a
    shape (with ``exact_dtype``, a dtype) differs. Nothing is copied unless everything matches."""
    required = own if required is None else required
    unknown = sorted(k for k in tensors if k not in own)
    missing = sorted(k for k in required if k not in tensors)
    if unknown or missing:
        raise CheckpointError(f"{where} does not match this {what}: missing {missing[:4]}, unexpected "
                              f"{unknown[:4]} ({hint})")
    for k, v in tensors.items():
        if own[k].shape != v.shape or (exact_dtype and own[k].dtype != v.dtype):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)} ({v.dtype}), expected "
                                  f"{tuple(own[k].shape)} ({own[k].dtype})")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))


def lm_output(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None, state: ModelState,
              return_logits: bool, return_token_nll: bool, aux: dict | None = None) -> ModelOutput:
    """The :class:`ModelOutput` of a model that computed logits (B, T, V) for every input position:
    every token but the first is scored (HF shift convention, -100 ignored)."""
    out = ModelOutput(loss=None, state=state, aux=aux or {}, last_logits=logits[:, -1],
                      logits=logits if return_logits else None)
    if labels is not None or return_token_nll:
        score_next_tokens(out, logits[:, :-1], input_ids, labels, return_token_nll)
    return out


def score_next_tokens(out: ModelOutput, logits: torch.Tensor, input_ids: torch.Tensor,
                      labels: torch.Tensor | None, return_token_nll: bool) -> ModelOutput:
    """Fill ``out``'s token NLL and (with labels) loss, nll_sum and num_tokens from the logits
    (B, T-1, V) that predict tokens 1..T-1 of ``labels`` (or ``input_ids``) (B, T)."""
    target = (labels if labels is not None else input_ids)[:, 1:]
    nll = next_token_nll(logits, target)  # (B, T-1)
    if return_token_nll:
        out.token_nll = nll.detach()
    if labels is not None:
        out.num_tokens = int((target != -100).sum())
        out.nll_sum = nll.sum()
        out.loss = out.nll_sum / max(out.num_tokens, 1)
    return out


class Decoder:
    """Incremental reader/writer over one model state (batch rows advance in lockstep).

    ``feed(ids (B, l))`` reads tokens and returns logits (B, V) for the next one; ``last_logits``
    holds the latest. ``current`` (B, c) holds tokens read but not yet folded into ``state`` (a
    segment or window in progress; always empty for models whose calls compose). ``snapshot()``
    returns (state, current): a decoder built from that state that is fed those ids is in the same
    condition (sessions save this).
    ``requires_grad``: decoding needs autograd (test-time learning); generation then does not
    switch gradients off.
    """

    requires_grad: ClassVar[bool] = False

    def __init__(self, model: "HiermemModel", state: ModelState | None = None, batch_size: int = 1,
                 last_logits: torch.Tensor | None = None):
        self.model = model
        self.state = state if state is not None else model.init_state(batch_size)
        self.last_logits = None if last_logits is None else last_logits.float()
        self.current = torch.zeros(self.state.batch_size, 0, dtype=torch.long, device=model.device)  # (B, c)

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @staticmethod
    def check_ids(ids: torch.Tensor) -> torch.Tensor:
        """ids (B, l >= 1) (a (B,) vector is one token per row); ValueError when empty."""
        if ids.dim() == 1:
            ids = ids[:, None]
        if ids.shape[1] == 0:
            raise ValueError("feed() needs at least one token")
        return ids

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Default: one forward call carrying the state (exact for models whose calls compose)."""
        out = self.model(self.check_ids(ids), state=self.state, return_logits=False)
        self.state, self.last_logits = out.state, out.last_logits.float()
        return self.last_logits

    def snapshot(self) -> tuple[ModelState, torch.Tensor]:
        return self.state, self.current

    @property
    def holds_cache(self) -> bool:
        """Whether the decoder holds more than its snapshot (KV caches a rebuilt decoder would
        recompute): what a session store may drop to save memory."""
        return self.current.shape[1] > 0

    @property
    def tokens_seen(self) -> int:
        return int(getattr(self.state, "tokens", 0)) + self.current.shape[1]

    def stats(self) -> dict:
        return {**self.state.stats(), "tokens": self.tokens_seen, "current_segment_tokens": self.current.shape[1]}

    @property
    def nbytes(self) -> int:
        return storage_nbytes(t for k, v in vars(self).items() if k != "model" for t in _tensors_in(v))

    def select_rows(self, idx: torch.Tensor) -> "Decoder":
        """A new decoder on rows ``idx`` (B',) of this one's state (this one is untouched)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if name != "model":
                setattr(new, name, pick_rows(value, idx, self.batch_size, copy_cache=True))
        return new

    def reorder_rows(self, idx: torch.Tensor) -> None:
        """Like :meth:`select_rows`, in place and without copying KV caches (beam search steps)."""
        batch = self.batch_size
        for name, value in list(vars(self).items()):
            if name != "model":
                setattr(self, name, pick_rows(value, idx, batch, copy_cache=False))


def _cache_tensors(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", [])
    return [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)]


def pick_rows(value, idx: torch.Tensor, batch: int, copy_cache: bool):
    """``value`` with batch rows ``idx`` taken: states (their own rule), tensors whose first dimension
    is the batch, transformers KV caches, lists/tuples of those; anything else unchanged."""
    if isinstance(value, ModelState):
        return value.select_rows(idx)
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx.to(value.device)) if value.dim() and value.shape[0] == batch else value
    if hasattr(value, "reorder_cache"):  # a transformers Cache: reordered in place
        value = copy.deepcopy(value) if copy_cache else value
        value.reorder_cache(idx.to(next((t.device for t in _cache_tensors(value)), idx.device)))
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(pick_rows(v, idx, batch, copy_cache) for v in value)
    return value


def _tensors_in(value) -> list[torch.Tensor]:
    """Every tensor held by ``value``: states, tensors, transformers KV caches, lists/tuples of those."""
    if isinstance(value, ModelState):
        return [t for t, _ in value.named_tensors().values()]
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "reorder_cache"):
        return _cache_tensors(value)
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


class HiermemModel(nn.Module):
    """Base class of every hiermem model (see the module docstring for the contract)."""

    config_class: ClassVar[type]
    state_class: ClassVar[type[ModelState]]
    decoder_class: ClassVar[type[Decoder]] = Decoder
    default_trainable: ClassVar[str] = "full"
    tokenizer = None  # set by the loaders; not a module, not saved with the weights

    # --- the protocol ------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> ModelState:
        raise NotImplementedError

    def checked_state(self, input_ids: torch.Tensor, state: ModelState | None,
                      labels: torch.Tensor | None = None) -> ModelState:
        """The state a ``forward`` call starts from (fresh when None), after checking that input_ids
        is (B, T >= 1), that the state holds B rows and that labels match input_ids; ValueError otherwise."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, tokens) with tokens > 0, got {tuple(input_ids.shape)}")
        B = input_ids.shape[0]
        state = state if state is not None else self.init_state(B)
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows but input has {B}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        return state

    def decoder(self, state: ModelState | None = None, batch_size: int = 1,
                last_logits: torch.Tensor | None = None) -> Decoder:
        return self.decoder_class(self, state=state, batch_size=batch_size, last_logits=last_logits)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def aux_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss in the training objective (absent names weigh 1)."""
        return {}

    def trainable_names(self, mode: str = "default") -> list[str]:
        """Parameter names trained in ``mode`` ("default" = ``default_trainable``)."""
        mode = self.default_trainable if mode == "default" else mode
        if mode != "full":
            raise ConfigError(f"{type(self).__name__} trains all its parameters: use trainable 'full' "
                              f"(or 'default'), not {mode!r}")
        return [n for n, _ in self.named_parameters()]

    def parameter_groups(self, names: list[str], weight_decay: float) -> list[dict]:
        """Optimizer groups over ``names``: matrices decay, vectors (norms, biases) do not."""
        params = dict(self.named_parameters())
        decay = [params[n] for n in names if params[n].dim() >= 2]
        other = [params[n] for n in names if params[n].dim() < 2]
        groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
                  {"name": "no_decay", "params": other, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def fingerprint(self) -> dict:
        """What a saved state must match to be read by this model."""
        arch = {k: v for k, v in self.config.to_dict().items() if k in self.architecture_fields()}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
        return {"model_type": self.config.model_type, "architecture": digest}

    def architecture_fields(self) -> tuple[str, ...]:
        """Config fields that change the shape or meaning of the state."""
        return tuple(self.config.to_dict())

    # --- persistence -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` stores (default: every parameter and persistent buffer)."""
        return dict(self.state_dict())

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer into ``folder``."""
        folder = Path(folder)
        tensors = {k: v for k, v in self.state_tensors().items()}
        save_tensors(folder / WEIGHTS_NAME, _untie(tensors), {"fingerprint": self.fingerprint()})
        atomic_write_json(folder / CONFIG_NAME, self.config.to_dict())
        if self.tokenizer is not None:
            from hiermem.tokenizers import save_tokenizer

            save_tokenizer(self.tokenizer, folder / TOKENIZER_DIR)

    def load_weights(self, folder: str | Path, strict: bool = True) -> None:
        """Load ``model.safetensors`` of ``folder`` into this model; CheckpointError on mismatch."""
        tensors, _ = load_tensors(Path(folder) / WEIGHTS_NAME, self.device)
        copy_checked(self.state_dict(), tensors, folder, type(self).__name__, required=None if strict else ())

    @classmethod
    def read_config(cls, folder: str | Path, **overrides):
        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists():
            raise CheckpointError(f"{folder} holds no {CONFIG_NAME}: not a hiermem model folder")
        return cls.config_class.from_dict({**read_json(folder / CONFIG_NAME), **overrides})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype=None, **overrides) -> "HiermemModel":
        """Rebuild a model saved by :meth:`save_pretrained` (config, weights, tokenizer)."""
        from hiermem.tokenizers import read_tokenizer

        config = cls.read_config(folder, **overrides)
        model = cls(config)
        model.load_weights(folder)
        model.tokenizer = read_tokenizer(Path(folder) / TOKENIZER_DIR)
        vocab = getattr(config, "vocab_size", None)
        if model.tokenizer is not None and vocab is not None and len(model.tokenizer) != vocab:
            raise CheckpointError(f"{folder}: its tokenizer has {len(model.tokenizer)} tokens but the model was built "
                                  f"for {vocab}; the tokenizer/ folder belongs to another model")
        return model.to(device=device, dtype=dtype)


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone tensors that share memory with an earlier one."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out
