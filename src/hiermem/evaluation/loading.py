"""Load what an evaluation needs, once: the backbone, HMT variants of one checkpoint, tokenised documents."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hiermem.backbones import DEFAULT_BACKBONE, Backbone, load_backbone, resolve_device, resolve_dtype
from hiermem.errors import DataError
from hiermem.evaluation.perplexity import HMT_METHODS, TokenDocument
from hiermem.io import read_json
from hiermem.models import load_model, model_folder


def checkpoint_config(checkpoint: str | None) -> dict:
    """The saved config of a checkpoint folder or released-weights name; {} for untrained memory."""
    folder = model_folder(checkpoint)
    return read_json(folder / "config.json") if folder is not None else {}


@dataclass
class EvalModels:
    """The bare backbone (baselines, tokenizer), the checkpoint as saved, and its variants by method."""

    backbone: Backbone
    model: torch.nn.Module
    variants: dict = field(default_factory=dict)


def load_eval_models(checkpoint: str | None = None, backbone: str | None = None, methods=(),
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                     **overrides) -> EvalModels:
    """Load the backbone once and the HMT variants that ``methods`` name (``rmt``, ``hmt-fifo``, ...).

    ``backbone`` defaults to the one the checkpoint names; a checkpoint made for another backbone
    raises :class:`CheckpointError`. ``overrides`` change HMT config fields (e.g. ``cache_size``).
    Variants share the backbone, except with LoRA checkpoints (adapters are injected in place, so
    each variant gets its own copy and the baselines keep the bare backbone).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    saved = checkpoint_config(checkpoint)
    spec = backbone or saved.get("backbone") or DEFAULT_BACKBONE
    bb = load_backbone(spec, device=dev, dtype=dt)
    lora = bool(saved.get("lora"))

    def load(**changes):
        hb = load_backbone(spec, device=dev, dtype=dt) if lora else bb
        return load_model(checkpoint, backbone=hb, device=dev, dtype=dt, **{**overrides, **changes}).eval()

    model = load()
    variants = {}
    for method in methods:
        if method in HMT_METHODS:
            changes = HMT_METHODS[method]
            same = all(getattr(model.config, k) == v for k, v in changes.items())
            variants[method] = model if same else load(**changes)
    return EvalModels(bb, model, variants)


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (models add BOS themselves where needed)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def load_token_documents(tokenizer, source: str = "shakespeare", split: str = "test", *,
                         text_column: str = "text") -> list[TokenDocument]:
    """Every document of ``split`` of ``source`` (see :func:`hiermem.data.load_documents`), tokenised."""
    from hiermem.data import load_documents

    docs = load_documents(source, split, text_column=text_column)
    return [TokenDocument(d.id, torch.tensor(tokenize(tokenizer, d.text), dtype=torch.long)) for d in docs]


def select_documents(docs: list[TokenDocument], min_tokens: int = 2, max_tokens: int | None = None,
                     max_documents: int | None = None) -> list[TokenDocument]:
    """The first ``max_documents`` documents with at least ``min_tokens`` tokens, cut to ``max_tokens``.

    DataError when none is long enough.
    """
    out = [TokenDocument(d.id, d.ids[:max_tokens]) for d in docs if d.ids.shape[0] >= min_tokens][:max_documents]
    if not out:
        longest = max((int(d.ids.shape[0]) for d in docs), default=0)
        raise DataError(f"none of the {len(docs)} documents has at least {min_tokens} tokens (the longest has "
                        f"{longest}); use longer documents, another split, or shorter segments")
    return out
