"""Training checkpoints: the model's ``save_pretrained`` output plus the trainer's state.

A checkpoint is a folder ``step-XXXXXXXX`` under the run folder. Single-process and DDP runs write

- whatever ``model.save_pretrained`` writes (so the folder loads with ``hiermem.models.load_model``);
- ``trainer_state.json``: step, counters, training time, best metric, training config,
  hyper-parameters and the launch layout (``world_size``, ``distributed_type``, ``sharding``);
- ``trainer_state.safetensors``: optimizer (and loss-scaler) state as tensors, its structure in the
  file's JSON metadata;
- ``trainer_rank-NNNNN.safetensors``: each process's RNG states and data-loader position;
- ``trainer_carried_state-NNNNN.safetensors``: each process's carried model state (``carry_state``).

FSDP runs (:mod:`hiermem.training.sharded`) write the same files, except that
``trainer_state.safetensors`` holds only the loss scaler (if any), plus ``accelerate_state/``:
Accelerate's ``SHARDED_STATE_DICT`` of the model (``pytorch_model_fsdp_0/``) and optimizer
(``optimizer_0/``), each a torch.distributed.checkpoint folder of ``__<rank>_0.distcp`` shards and
a ``.metadata`` index; the ``save_pretrained`` files hold the gathered full weights. Everything
hiermem reads itself is JSON or safetensors; torch reads the shards' pickled parts (``.metadata``,
non-tensor items) only after :func:`hiermem.training.sharded.check_shards` has vetted them.

It is written into a hidden temporary folder and renamed into place once complete, so a folder
named ``step-*`` is always whole. Nested states (optimizer, RNG, loader) become a JSON skeleton
plus a flat tensor dict through :func:`flatten_state` / :func:`unflatten_state`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from hiermem.errors import CheckpointError
from hiermem.io import atomic_write_json, load_tensors, read_json, save_tensors

log = logging.getLogger(__name__)

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
RANK_FILE = "trainer_rank-{:05d}.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_FILES = re.compile(r"^trainer_")


# --- nested state <-> (JSON skeleton, tensors) ---------------------------------------------------
def flatten_state(obj, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s"):
    """Split a nested state into a JSON-able skeleton and a flat tensor dict (returned as a pair).

    Tensors and numpy arrays are replaced by references; tuples and dicts with non-string keys
    are tagged so that :func:`unflatten_state` rebuilds them exactly.
    """
    tensors = {} if tensors is None else tensors

    def enc(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            tensors[path] = torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "ui" else x.copy())
            return {"__ndarray__": path, "dtype": str(x.dtype)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        raise CheckpointError(f"cannot store a {type(x).__name__} in a training checkpoint (at {path})")

    return enc(obj, prefix), tensors


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor], device=None):
    """Inverse of :func:`flatten_state`; tensors are moved to ``device`` when given."""

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            t = _tensor(tensors, x["__tensor__"])
            return t if device is None else t.to(device)
        if "__ndarray__" in x:
            return _tensor(tensors, x["__ndarray__"]).numpy().astype(x["dtype"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {dec(k): dec(v) for k, v in x["__items__"]}
        return {k: dec(v) for k, v in x.items()}

    return dec(skeleton)


def _tensor(tensors, key):
    if key not in tensors:
        raise CheckpointError(f"training state lacks tensor {key!r}; the checkpoint is incomplete")
    return tensors[key]


# --- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


# --- folders ---------------------------------------------------------------------------------------
def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(f for f in found if (f[1] / STATE_JSON).exists())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale(root: str | Path) -> None:
    """Delete temporary folders left by a run killed while writing."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(root: str | Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest periodic checkpoints."""
    for _, folder in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
        log.debug("removed old checkpoint %s", folder)


def publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished temporary folder to ``target`` (replacing an older one)."""
    old = None
    if target.exists():
        old = target.with_name(f".tmp-old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def new_tmp(root: Path, name: str) -> Path:
    tmp = Path(root) / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# --- trainer state files ---------------------------------------------------------------------------
def write_shared_state(folder: Path, state: dict, tensor_state: dict) -> None:
    """``state`` (JSON) and ``tensor_state`` (nested dict with tensors, e.g. the optimizer's)."""
    skeleton, tensors = flatten_state(tensor_state)
    save_tensors(folder / STATE_TENSORS, tensors, {"skeleton": skeleton})
    atomic_write_json(folder / STATE_JSON, state)  # written last: marks the folder complete


def read_shared_state(folder: Path, device=None) -> tuple[dict, dict]:
    state = read_json(folder / STATE_JSON)
    tensors, meta = load_tensors(folder / STATE_TENSORS)
    return state, unflatten_state(meta.get("skeleton", {}), tensors, device)


def write_rank_state(folder: Path, rank: int, state: dict) -> None:
    skeleton, tensors = flatten_state(state)
    save_tensors(folder / RANK_FILE.format(rank), tensors, {"skeleton": skeleton})


def read_rank_state(folder: Path, rank: int) -> dict:
    path = folder / RANK_FILE.format(rank)
    if not path.exists():
        raise CheckpointError(f"{folder} has no state for process {rank}; it was written by a run with fewer "
                              "processes. Resume with the same number of processes")
    tensors, meta = load_tensors(path)
    return unflatten_state(meta.get("skeleton", {}), tensors)


def load_trainable(model: torch.nn.Module, folder: Path, names: list[str]) -> None:
    """Copy the parameters ``names`` from the model files of a checkpoint folder into ``model``.

    The model's ``save_pretrained`` must store them in safetensors files keyed by parameter name.
    """
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if not TRAINER_FILES.match(path.name):
            found.update(load_tensors(path)[0])
    missing = [n for n in names if n not in found]
    if missing:
        raise CheckpointError(f"{folder} lacks trainable parameters {missing[:4]} (of {len(missing)}); "
                              "it was saved with another trainable set or model configuration")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if params[name].shape != found[name].shape:
                raise CheckpointError(f"{folder}: {name} has shape {tuple(found[name].shape)}, the model's is "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(found[name])
