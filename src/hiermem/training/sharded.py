"""Checkpoints of sharded (FSDP) runs: Accelerate's per-rank model and optimizer shards, plus
consolidated ``save_pretrained`` weights written by the main process.

Under FSDP every process holds a slice of each parameter and of its optimizer state, so the trainer
cannot write them as one tensor file. :func:`save_shards` stores them with Accelerate's
``save_fsdp_model`` / ``save_fsdp_optimizer`` as ``SHARDED_STATE_DICT`` (torch.distributed.checkpoint:
``pytorch_model_fsdp_0/`` and ``optimizer_0/``, each with ``__<rank>_0.distcp`` files and a
``.metadata`` index) and :func:`load_shards` reads them back with the matching ``load_*`` functions.
Torch reads the tensor data with ``torch.load(weights_only=True)``, but the ``.metadata`` index
with ``pickle.load`` and non-tensor items (optimizer hyper-parameters) with
``torch.load(weights_only=False)``; :func:`check_shards` therefore first replays the index with an
unpickler that admits only checkpoint-metadata classes and loads every non-tensor item with
``weights_only=True``, refusing the folder if either fails.

The readable weights come from a *meta twin*: a copy of the model made before sharding whose
tensors live on the meta device (no memory). At each save the full state dict is gathered
(``accelerator.get_state_dict``) and assigned to a fresh copy of the twin on the main process,
which writes it with the model's own ``save_pretrained``.

DeepSpeed is refused: its engine runs backward and the optimizer step itself, while this trainer
weights gradients by tokens and steps the optimizer on its own.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import torch

from hiermem.errors import CheckpointError, ConfigError

SHARDS_DIR = "accelerate_state"
_ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


def sharding(accelerator) -> str | None:
    """"fsdp" or "deepspeed" when the Accelerator shards parameters, else None."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    state = accelerator.state
    if kind == "DEEPSPEED" or getattr(state, "deepspeed_plugin", None) is not None:
        return "deepspeed"
    if kind == "FSDP" or getattr(state, "fsdp_plugin", None) is not None:
        return "fsdp"
    return None


def check_supported(accelerator) -> str | None:
    """The run's sharding ("fsdp" or None); ConfigError under DeepSpeed."""
    kind = sharding(accelerator)
    if kind == "deepspeed":
        raise ConfigError("the hiermem trainer does not run under DeepSpeed (its engine runs backward and the "
                          "optimizer step, which this trainer does itself with token-weighted gradients); launch "
                          "with FSDP instead (accelerate launch --use_fsdp --fsdp_version 2) or plain DDP")
    return kind


def describe(accelerator) -> dict:
    """What a sharded checkpoint must match on resume (saved in ``trainer_state.json``)."""
    kind = sharding(accelerator)
    info = {"sharding": kind, "world_size": accelerator.num_processes,
            "distributed_type": str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))}
    if kind == "fsdp":
        info["fsdp_version"] = int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))
    return info


def check_resume(saved: dict, now: dict, folder: Path) -> None:
    """CheckpointError unless a checkpoint's layout (``saved``) fits this run (``now``)."""
    keys = ("sharding", "world_size", "distributed_type", "fsdp_version")
    if not saved.get("sharding") and not now["sharding"]:
        if saved.get("world_size") != now["world_size"]:
            raise CheckpointError(f"{folder} was written by {saved.get('world_size')} processes, this run has "
                                  f"{now['world_size']}; resume with the same number of processes")
        return
    if any(saved.get(k) != now.get(k) for k in keys):
        def layout(d):
            kind = d.get("sharding")
            version = f" v{d.get('fsdp_version')}" if kind == "fsdp" else ""
            how = f"{kind.upper()}{version}" if kind else "unsharded"
            return f"{how} ({d.get('distributed_type')}) on {d.get('world_size')} processes"

        raise CheckpointError(f"{folder} holds the state of a {layout(saved)} run; this run is {layout(now)}. "
                              "Resume it with the same launch settings (e.g. accelerate launch --use_fsdp "
                              f"--num_processes {saved.get('world_size')}), or start a new run from its weights "
                              "(the save_pretrained files in the folder) in another output folder")


def clip_grad_norm(wrapped, params: list, max_norm: float) -> torch.Tensor:
    """Clip the gradients of sharded ``params`` by their global norm; return that norm.

    (Accelerate's ``clip_grad_norm_`` compares parameter lists of every prepared model, which fails
    once a second model, e.g. a recipe's next stage, has been prepared.)"""
    from torch.distributed.tensor import DTensor

    if hasattr(wrapped, "clip_grad_norm_"):  # FSDP1: flat parameters
        return wrapped.clip_grad_norm_(max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # FSDP2: DTensor gradients on one mesh
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# --- the meta twin and consolidated weights ---------------------------------------------------------
def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (call before sharding) whose parameters and buffers are on the meta device."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else meta
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer  # shared, not copied
    return copy.deepcopy(model, memo)


def save_pretrained_full(accelerator, wrapped, twin: torch.nn.Module, folder: Path) -> None:
    """Gather the full weights (all processes must call this) and write them with ``save_pretrained``
    into ``folder`` on the main process."""
    from torch.distributed.tensor import DTensor

    full = {}
    for name, value in accelerator.get_state_dict(wrapped).items():
        if isinstance(value, DTensor):  # still sharded: gather it, one tensor at a time
            value = value.full_tensor()
        if accelerator.is_main_process:
            full[name] = value.detach().cpu()
    if accelerator.is_main_process:
        tokenizer = getattr(twin, "tokenizer", None)
        model = copy.deepcopy(twin, {} if tokenizer is None else {id(tokenizer): tokenizer})
        model.load_state_dict(full, strict=True, assign=True)
        model.save_pretrained(folder)


# --- shards -----------------------------------------------------------------------------------------
class _StateDictType:
    """Switch the FSDP plugin to SHARDED_STATE_DICT for the duration of a save or load."""

    def __init__(self, plugin):
        self.plugin = plugin

    def __enter__(self):
        p = self.plugin
        self.saved = (p.state_dict_type, p.state_dict_config, p.optim_state_dict_config)
        p.state_dict_config = p.optim_state_dict_config = None
        p.set_state_dict_type("SHARDED_STATE_DICT")

    def __exit__(self, *exc):
        self.plugin.state_dict_type, self.plugin.state_dict_config, self.plugin.optim_state_dict_config = self.saved


def save_shards(accelerator, wrapped, optimizer, folder: Path) -> None:
    """Write this process's model and optimizer shards under ``folder / SHARDS_DIR`` (collective)."""
    from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

    plugin = accelerator.state.fsdp_plugin
    target = str(Path(folder) / SHARDS_DIR)
    with _StateDictType(plugin):
        save_fsdp_model(plugin, accelerator, wrapped, target)
        save_fsdp_optimizer(plugin, accelerator, optimizer, wrapped, target)


def load_shards(accelerator, wrapped, optimizer, folder: Path) -> None:
    """Read the shards written by :func:`save_shards` into the prepared model and optimizer (collective)."""
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

    source = Path(folder) / SHARDS_DIR
    parts = [source / "pytorch_model_fsdp_0", source / "optimizer_0"]
    for part in parts:
        if not (part / ".metadata").is_file():
            raise CheckpointError(f"{folder} lacks {part.relative_to(folder)}/.metadata: the sharded state is "
                                  "incomplete; resume from another checkpoint")
        check_shards(part)
    plugin = accelerator.state.fsdp_plugin
    with _StateDictType(plugin):
        load_fsdp_model(plugin, accelerator, wrapped, str(source))
        load_fsdp_optimizer(plugin, accelerator, optimizer, wrapped, str(source))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = ((module, name) in _ALLOWED or module == "torch.distributed.checkpoint.metadata"
                   or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")
        return super().find_class(module, name)


def check_shards(folder: Path) -> None:
    """CheckpointError unless the torch.distributed.checkpoint ``folder`` is safe to read: its
    ``.metadata`` pickle holds only checkpoint-metadata objects, and every non-tensor item (which
    torch's default planner unpickles without restriction) loads with ``weights_only=True``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(folder) / ".metadata"
    try:
        meta = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        byte_items = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
        for index, info in meta.storage_data.items():
            if index.fqn not in byte_items:
                continue
            if info.transform_descriptors:
                raise ValueError(f"item {index.fqn} is stored with transforms {info.transform_descriptors}")
            with open(Path(folder) / info.relative_path, "rb") as fh:
                fh.seek(info.offset)
                torch.load(io.BytesIO(fh.read(info.length)), weights_only=True)
    except Exception as exc:  # any failure means: do not let torch unpickle this folder
        lines = str(exc).splitlines() or [type(exc).__name__]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise CheckpointError(f"refusing to load {folder}: {reason.strip()} It is not a checkpoint written by "
                              "torch.distributed.checkpoint with plain values; load only checkpoints you wrote") from exc
