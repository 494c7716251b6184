"""Load what an evaluation needs, once: the checkpoint and its variants, the backbone of the
baselines (models that wrap one), the tokenizer, tokenised documents."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from hiermem.backbones import DEFAULT_BACKBONE, Backbone, load_backbone, resolve_device, resolve_dtype, resolve_spec
from hiermem.errors import CheckpointError, ConfigError, DataError
from hiermem.evaluation.perplexity import MODEL_METHOD, TokenDocument, available_methods, check_methods
from hiermem.io import read_json
from hiermem.models import ModelSpec, folder_model_type, load_model, model_folder, model_spec

log = logging.getLogger(__name__)


def checkpoint_config(checkpoint: str | None) -> dict:
    """The saved config of a checkpoint folder or released-weights name; {} for untrained memory."""
    folder = model_folder(checkpoint)
    return read_json(folder / "config.json") if folder is not None else {}


def checkpoint_spec(checkpoint: str | None) -> ModelSpec:
    """The registry spec of a checkpoint's model type (no weights read); untrained memory is HMT."""
    folder = model_folder(checkpoint)
    return model_spec(folder_model_type(folder) if folder is not None else "hmt")


@dataclass
class EvalModels:
    """What an evaluation reads with: the backbone of the baselines (None for models without one),
    the checkpoint as saved, its variants by method (``model`` included when asked for), the
    tokenizer (``model.tokenizer``; for HMT the backbone's) and the registry spec."""

    backbone: Backbone | None
    model: torch.nn.Module
    variants: dict = field(default_factory=dict)
    tokenizer: object = None
    spec: ModelSpec | None = None

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer = getattr(self.model, "tokenizer", None)

    @property
    def model_type(self) -> str:
        return self.spec.model_type if self.spec is not None else self.model.config.model_type


def _check_overrides(spec: ModelSpec, overrides: dict) -> None:
    cls = spec.config_class()
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(overrides)
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{spec.model_type} models have no option(s) {', '.join(unknown)}")


def load_eval_models(checkpoint: str | None = None, backbone: str | None = None, methods=(),
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                     **overrides) -> EvalModels:
    """Load the checkpoint (via :func:`hiermem.models.load_model`), the variants that ``methods`` name
    (``model``, ``rmt``, ``hmt-fifo``, ...) and, for models with a pretrained backbone, that backbone.

    ``backbone`` defaults to the one the checkpoint names; a checkpoint made for another backbone
    raises :class:`CheckpointError`; models without one refuse it (ConfigError). ``overrides``
    change config fields (e.g. ``cache_size``). Variants share the backbone, except with LoRA
    checkpoints (adapters are injected in place, so each variant gets its own copy and the
    baselines keep the bare backbone). Quantized folders load their int8 model (CPU); its int8
    backbone serves the baselines.
    """
    from hiermem.inference.quantize import is_quantized

    folder = model_folder(checkpoint)
    spec = checkpoint_spec(checkpoint)
    methods = check_methods(methods, available_methods(spec)) if methods else []
    _check_overrides(spec, overrides)
    if backbone and not spec.pretrained_backbone:
        raise ConfigError(f"{spec.model_type} models have no pretrained backbone: drop --backbone")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    bb, fresh_backbone = None, None  # fresh_backbone: a new copy per variant (LoRA is injected in place)
    quantized = folder is not None and is_quantized(folder)
    placement = {} if quantized else {"device": dev, "dtype": dt}  # int8 models load on the CPU as saved
    if spec.pretrained_backbone and not quantized:
        saved = read_json(folder / "config.json") if folder is not None else {}
        bspec = backbone or saved.get("backbone") or DEFAULT_BACKBONE
        bb = load_backbone(bspec, device=dev, dtype=dt)
        if saved.get("lora"):
            fresh_backbone = lambda: load_backbone(bspec, device=dev, dtype=dt)  # noqa: E731

    def load(**changes):
        with_backbone = {"backbone": fresh_backbone() if fresh_backbone else bb} if bb is not None else {}
        return load_model(checkpoint, **placement, **with_backbone, **{**overrides, **changes}).eval()

    model = load()
    if quantized and spec.pretrained_backbone:  # its int8 backbone serves the baselines
        sub = str(folder / "backbone")
        bb = Backbone(model=model.backbone, tokenizer=model.tokenizer, spec=sub, needs_bos=resolve_spec(sub)[1])
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError(f"{folder} holds no tokenizer (tokenizer/): save the model with its tokenizer")
    variants = {}
    for method in methods:
        if method == MODEL_METHOD:
            variants[method] = model
        elif method in spec.eval_variants:
            changes = spec.eval_variants[method]
            same = all(getattr(model.config, k) == v for k, v in changes.items())
            variants[method] = model if same else load(**changes)
    return EvalModels(bb, model, variants, model.tokenizer, spec)


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (models add BOS themselves where needed)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def id_list(names: list[str], shown: int = 5) -> str:
    """Document ids for a message: the first few, then how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_token_documents(tokenizer, source: str = "shakespeare", split: str = "test", *,
                         text_column: str = "text") -> list[TokenDocument]:
    """Every document of ``split`` of ``source`` (see :func:`hiermem.data.load_documents`), tokenised.

    For a user's own source (not a built-in corpus) a split other than "all" leaves documents out:
    a warning names them and says why.
    """
    from hiermem.data import load_documents, select_split
    from hiermem.data.corpora import CORPORA

    if source in CORPORA or split == "all":
        docs = load_documents(source, split, text_column=text_column)
    else:
        every = load_documents(source, "all", text_column=text_column)
        docs = select_split(every, split, source=source)
        kept = {d.id for d in docs}
        left = [d.id for d in every if d.id not in kept]
        if left:
            log.warning("split %r of %s: evaluating %d of its %d documents; left out (they fall in another split "
                        "by a stable hash of their id): %s; --split all reads every document", split, source,
                        len(docs), len(every), id_list(left))
    return [TokenDocument(d.id, torch.tensor(tokenize(tokenizer, d.text), dtype=torch.long)) for d in docs]


def select_documents(docs: list[TokenDocument], min_tokens: int = 2, max_tokens: int | None = None,
                     max_documents: int | None = None) -> list[TokenDocument]:
    """The first ``max_documents`` documents with at least ``min_tokens`` tokens, cut to ``max_tokens``;
    a warning names the documents left out as too short, a log line those beyond ``max_documents``.

    DataError when none is long enough.
    """
    long_enough = [d for d in docs if d.ids.shape[0] >= min_tokens]
    if not long_enough:
        longest = max((int(d.ids.shape[0]) for d in docs), default=0)
        raise DataError(f"none of the {len(docs)} documents has at least {min_tokens} tokens (the longest has "
                        f"{longest}); use longer documents, another split, or shorter segments")
    short = [d.id for d in docs if d.ids.shape[0] < min_tokens]
    if short:
        log.warning("left out %d document(s) shorter than %d tokens: %s", len(short), min_tokens, id_list(short))
    if max_documents is not None and len(long_enough) > max_documents:
        log.info("reading the first %d of %d documents (--documents); left out: %s", max_documents,
                 len(long_enough), id_list([d.id for d in long_enough[max_documents:]]))
    return [TokenDocument(d.id, d.ids[:max_tokens]) for d in long_enough[:max_documents]]
