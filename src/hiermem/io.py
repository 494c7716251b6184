"""Safe, atomic file I/O shared by models, memory states and checkpoints (safetensors + JSON)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hiermem.errors import CheckpointError

log = logging.getLogger(__name__)


def _proc_umask() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_at_import() -> int:
    umask = _proc_umask()
    if umask is None:  # no /proc: set and restore once, at import, before this package writes files
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _umask_at_import()


def _read_umask() -> int:
    """The process umask, read without changing it: ``os.umask`` can only be read by setting it,
    which races with threads creating files (a thread could leave the process with the wrong umask)."""
    umask = _proc_umask()
    return _UMASK_AT_IMPORT if umask is None else umask


def _publish(tmp: str, path: Path) -> None:
    """Give a finished temp file normal permissions (mkstemp makes it 0600) and rename it."""
    os.chmod(tmp, 0o666 & ~_read_umask())
    os.replace(tmp, path)


def dataclass_from_dict(cls, data: dict, label: str):
    """Build config dataclass ``cls`` from saved JSON: missing fields take their defaults (old
    files), unknown fields are ignored with a warning (files from a newer version)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        log.warning("ignoring unknown %s fields %s (saved by a newer hiermem?)", label, unknown)
    return cls(**{k: v for k, v in data.items() if k in names})


def check_ints(config, names, low: int = 1, allow_none: bool = False, what: str = "") -> None:
    """ConfigError unless each field ``names`` of ``config`` is an int >= ``low`` (or None when
    ``allow_none``); ``what`` prefixes the field name in the message (e.g. "transformer ")."""
    from hiermem.errors import ConfigError

    for name in names:
        v = getattr(config, name)
        if v is None and allow_none:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            bound = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"{what}{name} must be {bound}, got {v!r}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically save tensors as safetensors; ``metadata`` is stored as one JSON string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(clean, tmp, metadata={"hiermem": json.dumps(metadata or {})})
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file saved by :func:`save_tensors` -> (tensors, metadata)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing file: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("hiermem", "{}"))
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it is corrupt or "
                              "truncated — restore it or retrain") from exc
    return tensors, meta
