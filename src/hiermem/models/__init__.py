"""Model registry: ``model_type -> ModelSpec``. Every hiermem model is a folder here
(config.py + model.py) registered below; adding a model is adding a folder and one entry.

The contract every model implements is in :mod:`hiermem.models.base`, its state's in
:mod:`hiermem.models.state`. ``load_model`` is the one loader every command uses: a checkpoint
folder (trained, released or quantized) means the same model everywhere.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hiermem.errors import CheckpointError
from hiermem.io import read_json
from hiermem.models.base import Decoder, HiermemModel, ModelOutput
from hiermem.models.state import EmptyState, ModelState, batch_field

log = logging.getLogger(__name__)

WEIGHTS_ROOT = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_RELEASE = "hmt-smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """How the shared layers find and use one model family.

    model: "module:Class" of the :class:`HiermemModel`. pretrained_backbone: wraps a pretrained
    causal LM (``from_pretrained`` then takes ``backbone=``; the evaluator adds the backbone's
    chunk/sliding/full-context baselines). eval_variants: extra ``hiermem eval`` methods as config
    overrides of the loaded checkpoint (ablations). recipe: "module:function" of its ``hiermem train``
    command (None: the from-scratch recipe, ``hiermem.training.cli:train_model``). default_config: a bundled YAML recipe.
    """

    model_type: str
    model: str
    description: str = ""
    pretrained_backbone: bool = False
    eval_variants: dict = field(default_factory=dict)
    recipe: str | None = None
    default_config: str | None = None

    def model_class(self) -> type[HiermemModel]:
        module, name = self.model.split(":")
        return getattr(importlib.import_module(module), name)

    def config_class(self) -> type:
        return self.model_class().config_class


REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add a model family to the registry (``replace`` to redefine one)."""
    if spec.model_type in REGISTRY and not replace:
        raise ValueError(f"model type {spec.model_type!r} is already registered")
    REGISTRY[spec.model_type] = spec
    return spec


def model_spec(model_type: str) -> ModelSpec:
    """The spec of a registered model type; CheckpointError listing the known ones otherwise."""
    if model_type not in REGISTRY:
        raise CheckpointError(f"unknown model type {model_type!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[model_type]


register_model(ModelSpec(
    "hmt", "hiermem.models.hmt:HMT",
    description="Hierarchical Memory Transformer over a pretrained causal LM (arXiv 2405.06067)",
    pretrained_backbone=True,
    eval_variants={"sensory": {"use_memory": False}, "rmt": {"stage": 1},
                   "hmt-fifo": {"stage": 2, "eviction": "fifo"},
                   "hmt-attention": {"stage": 2, "eviction": "attention"}},
    recipe="hiermem.training.cli:train"))
register_model(ModelSpec(
    "transformer", "hiermem.models.transformer:Transformer",
    description="Llama-style transformer trained from scratch (the control model of every family)",
    default_config="transformer-cpu"))
register_model(ModelSpec(
    "hrmlm", "hiermem.models.hrmlm:HRMLM",
    description="Hierarchical recurrent memory LM: two GRU levels, N x T cycles per token, trained from scratch",
    default_config="hrmlm-cpu"))
register_model(ModelSpec(
    "hierarchos", "hiermem.models.hierarchos:Hierarchos",
    description="Hierarchos: Titans-style surprise-updated long-term memory + HRM manager/worker (RWKV cells, "
                "ACT pondering), trained from scratch",
    default_config="hierarchos-cpu"))
register_model(ModelSpec(
    "hmst", "hiermem.models.hmst:HMST",
    description="HMST: windowed-attention MoE decoder (top-k SwiGLU experts) with an episodic selective SSM "
                "memory, trained from scratch; --stage 2|3 trains its memory, critic and meta-controller",
    default_config="hmst-micro", recipe="hiermem.training.hmst_stages:train_hmst"))


def released_weights(name: str = DEFAULT_RELEASE) -> Path | None:
    """Folder of weights shipped with the package, or None when absent."""
    folder = WEIGHTS_ROOT / name
    return folder if (folder / "config.json").exists() else None


def model_folder(spec: str | Path | None) -> Path | None:
    """The checkpoint folder behind a model spec: a folder, a released-weights name, or
    ``None``/"default" (the default release; None when it is not installed).

    CheckpointError when ``spec`` names neither a folder holding config.json nor a release.
    """
    if spec in (None, "default", DEFAULT_RELEASE):
        return released_weights()
    folder = released_weights(str(spec)) or Path(spec).expanduser()
    if not (folder / "config.json").exists():
        installed = ", ".join(p.name for p in WEIGHTS_ROOT.glob("*")) or "none installed"
        raise CheckpointError(f"{str(spec)!r} is neither a checkpoint folder (with config.json) nor a released "
                              f"weights name ({installed}); pass a folder written by `hiermem train` or "
                              "`hiermem quantize`")
    return folder


def folder_model_type(folder: str | Path) -> str:
    """The model type a checkpoint folder's config.json names (old HMT folders name none)."""
    return read_json(Path(folder) / "config.json").get("model_type", "hmt")


def load_model(spec: str | Path | None = None, backbone=None, device=None, dtype=None, **overrides) -> HiermemModel:
    """Load a model (with ``.tokenizer`` set) from a checkpoint folder, a released-weights name, or
    ``None``/"default" (the released HMT for the bundled backbone; untrained memory when absent).

    Quantized folders load their int8 model. ``backbone`` (a :class:`hiermem.Backbone`) is reused
    by models that wrap one; ``overrides`` change config fields at load time.
    """
    folder = model_folder(spec)
    if folder is None:
        from hiermem.backbones import DEFAULT_BACKBONE, load_backbone
        from hiermem.models.hmt import HMT, HMTConfig

        log.warning("no released HMT weights installed: using untrained memory")
        bb = backbone or load_backbone(DEFAULT_BACKBONE, device=device, dtype=dtype)
        model = HMT(bb.model, HMTConfig(**overrides), bos_token_id=bb.tokenizer.bos_token_id)
        model.tokenizer = bb.tokenizer
        return model
    from hiermem.inference.quantize import is_quantized, load_quantized

    if is_quantized(folder):
        return load_quantized(folder, **overrides)
    spec_ = model_spec(folder_model_type(folder))
    kwargs = {"backbone": backbone} if spec_.pretrained_backbone else {}
    return spec_.model_class().from_pretrained(folder, device=device, dtype=dtype, **kwargs, **overrides)


__all__ = ["REGISTRY", "Decoder", "EmptyState", "HiermemModel", "ModelOutput", "ModelSpec", "ModelState",
           "batch_field", "folder_model_type", "load_model", "model_folder", "model_spec", "register_model",
           "released_weights"]
