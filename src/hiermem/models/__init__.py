"""Model registry: every hiermem model is a folder here with config.py + model.py.

A model implements the small interface the trainer, evaluator, generator and server use:
``forward(input_ids, memory=None, labels=None, ...) -> MemoryModelOutput``, ``init_memory(batch)``,
``memory_parameters()``, ``save_pretrained(folder)`` / ``from_pretrained(folder)``, and a
decoder class for incremental generation.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from hiermem.errors import CheckpointError
from hiermem.io import read_json

log = logging.getLogger(__name__)

# model_type -> (module, model class, config class, decoder class)
MODELS = {"hmt": ("hiermem.models.hmt", "HMT", "HMTConfig", "HMTDecoder")}

WEIGHTS_ROOT = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_RELEASE = "hmt-smollm2-135m"


def model_classes(model_type: str):
    """(model class, config class, decoder class) for a registered model type."""
    if model_type not in MODELS:
        raise CheckpointError(f"unknown model type {model_type!r}; known: {sorted(MODELS)}")
    module, model, config, decoder = MODELS[model_type]
    mod = importlib.import_module(module)
    return getattr(mod, model), getattr(mod, config), getattr(mod, decoder)


def released_weights(name: str = DEFAULT_RELEASE) -> Path | None:
    """Folder of memory weights shipped with the package, or None when absent."""
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


def load_model(spec: str | None = None, backbone=None, device=None, dtype=None, **overrides):
    """Load a model from a checkpoint folder, a released-weights name, or ``None``/"default".

    ``None``/"default" uses the released HMT weights for the bundled backbone when they are
    installed, else a fresh (untrained) HMT over the bundled backbone.
    """
    folder = model_folder(spec)
    if folder is None:
        from hiermem.backbones import DEFAULT_BACKBONE, load_backbone
        from hiermem.models.hmt import HMT, HMTConfig

        log.warning("no released HMT weights installed: using untrained memory")
        bb = backbone or load_backbone(DEFAULT_BACKBONE, device=device, dtype=dtype)
        return HMT(bb.model, HMTConfig(**overrides), bos_token_id=bb.tokenizer.bos_token_id)
    model_type = read_json(folder / "config.json").get("model_type", "hmt")
    model_cls, _, _ = model_classes(model_type)
    return model_cls.from_pretrained(folder, backbone=backbone, device=device, dtype=dtype, **overrides)
