"""The state protocol: what a model carries from one call to the next, as plain data.

A state is a dataclass deriving from :class:`ModelState`. Its fields are tensors (each with the
dimension that holds the batch, declared with :func:`batch_field`; ``batch_dim=None`` for tensors
shared by every row), nested states, ``None``, or JSON-able scalars (counters). From that
declaration alone every state gets the utilities that trainers, generators and servers need:

- ``select_rows(idx)``: rows ``idx`` (B',) of every batched tensor (beams, forks, repeats);
- ``reset_rows(mask, fresh)``: rows where ``mask`` (B,) is set are replaced by ``fresh``'s rows
  (a new document starts in a carried stream);
- ``detach()``, ``to(device, dtype)``, ``nbytes``, ``batch_size``;
- ``save(path, fingerprint)`` / ``load(path, ...)``: one safetensors file (atomic), with the
  model's fingerprint checked on load; ``fingerprint()``: a digest of the contents.

States whose rows cannot be handled field by field (e.g. a bank whose slot count is shared by
all rows) override the methods they need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from hiermem.errors import CheckpointError
from hiermem.io import load_tensors, save_tensors


def batch_field(dim: int | None = 0, **kwargs):
    """A dataclass field holding a tensor whose batch rows lie along ``dim`` (None: not batched)."""
    metadata = {**kwargs.pop("metadata", {}), "batch_dim": dim}
    return field(metadata=metadata, **kwargs)


def storage_nbytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _nested_state_class(owner: type, name: str):
    """The ModelState subclass a field of ``owner`` is annotated with (Optional unwrapped), or None."""
    hint = typing.get_type_hints(owner).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, ModelState):
            return candidate
    return None


@dataclass
class ModelState:
    """Base class of every model state (see the module docstring)."""

    KIND: ClassVar[str] = "state"

    # --- traversal -------------------------------------------------------------------------
    def _fields(self):
        for f in dataclasses.fields(self):
            if f.init:
                yield f, getattr(self, f.name)

    def map_tensors(self, fn) -> "ModelState":
        """A copy with ``fn(tensor, batch_dim)`` applied to every tensor (nested states included)."""
        changes = {}
        for f, value in self._fields():
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value, f.metadata.get("batch_dim", 0))
            elif isinstance(value, ModelState):
                changes[f.name] = value.map_tensors(fn)
        return dataclasses.replace(self, **changes)

    def named_tensors(self, prefix: str = "") -> dict[str, tuple[torch.Tensor, int | None]]:
        """Flat ``{dotted name: (tensor, batch_dim)}`` of every tensor in the state."""
        out = {}
        for f, value in self._fields():
            if isinstance(value, torch.Tensor):
                out[prefix + f.name] = (value, f.metadata.get("batch_dim", 0))
            elif isinstance(value, ModelState):
                out.update(value.named_tensors(f"{prefix}{f.name}."))
        return out

    # --- rows -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        for tensor, dim in self.named_tensors().values():
            if dim is not None:
                return tensor.shape[dim]
        raise ValueError(f"{type(self).__name__} holds no batched tensor")

    def select_rows(self, idx: torch.Tensor) -> "ModelState":
        """Rows ``idx`` (B',) of the state; repeating an index forks that row."""
        return self.map_tensors(lambda t, d: t if d is None else t.index_select(d, idx.to(t.device)))

    def reset_rows(self, mask: torch.Tensor, fresh: "ModelState") -> "ModelState":
        """Rows where ``mask`` (B,) is True taken from ``fresh`` (same batch size), the others kept."""
        if not bool(mask.any()):
            return self
        if bool(mask.all()):
            return fresh
        theirs = fresh.named_tensors()

        def pick(prefix, state):
            changes = {}
            for f, value in state._fields():
                name = prefix + f.name
                if isinstance(value, ModelState):
                    changes[f.name] = pick(name + ".", value)
                elif isinstance(value, torch.Tensor) and f.metadata.get("batch_dim", 0) is not None:
                    other, dim = theirs[name]
                    if other.shape != value.shape:
                        raise ValueError(f"{type(self).__name__}.{name}: rows cannot be reset one by one "
                                         f"({tuple(value.shape)} vs fresh {tuple(other.shape)})")
                    shape = [1] * value.dim()
                    shape[dim] = -1
                    changes[f.name] = torch.where(mask.to(value.device).view(shape), other, value)
            return dataclasses.replace(state, **changes)

        return pick("", self)

    def detach(self) -> "ModelState":
        """Cut the gradient chain (truncated BPTT boundary)."""
        return self.map_tensors(lambda t, d: t.detach())

    def to(self, device=None, dtype=None) -> "ModelState":
        """Move every tensor; ``dtype`` applies to floating-point tensors only."""
        return self.map_tensors(lambda t, d: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @property
    def nbytes(self) -> int:
        return storage_nbytes(t for t, _ in self.named_tensors().values())

    def stats(self) -> dict:
        """Small JSON-able summary (counters, batch size, bytes)."""
        out = {f.name: v for f, v in self._fields() if isinstance(v, (int, float, str, bool))}
        return {**out, "batch_size": self.batch_size, "state_bytes": self.nbytes}

    def fingerprint(self) -> str:
        """sha256 over every tensor's name, shape, dtype and bytes, and the scalar fields."""
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for name, (tensor, _) in sorted(self.named_tensors().items()):
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    # --- persistence ------------------------------------------------------------------------
    def _meta(self) -> dict:
        meta = {}
        for f, value in self._fields():
            if isinstance(value, ModelState):
                meta[f.name] = {"state": value._meta()}
            elif value is None:
                meta[f.name] = {"none": True}
            elif not isinstance(value, torch.Tensor):
                meta[f.name] = {"value": value}
        return meta

    @classmethod
    def _build(cls, meta: dict, tensors: dict[str, torch.Tensor], prefix: str = ""):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            entry = meta.get(f.name)
            name = prefix + f.name
            if entry is None:
                if name in tensors:
                    kwargs[f.name] = tensors[name]
                elif f.default is not dataclasses.MISSING:  # a field added after the file was written
                    kwargs[f.name] = f.default
                else:
                    raise KeyError(name)
            elif "state" in entry:
                sub = _nested_state_class(cls, f.name)
                if sub is None:
                    raise KeyError(name)
                kwargs[f.name] = sub._build(entry["state"], tensors, name + ".")
            elif entry.get("none"):
                kwargs[f.name] = None
            else:
                kwargs[f.name] = entry["value"]
        return cls(**kwargs)

    def to_tensors(self, fingerprint: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """(flat tensors, JSON metadata) of the state: what :meth:`save` writes, for callers that
        store a state inside a file of their own (sessions)."""
        tensors = {name: t for name, (t, _) in self.named_tensors().items()}
        return tensors, {"kind": self.KIND, "fields": self._meta(), "fingerprint": fingerprint or {}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, dtype=None, fingerprint: dict | None = None,
                     where: str = "state") -> "ModelState":
        """Inverse of :meth:`to_tensors`; CheckpointError for another kind, another model or an
        incomplete state (``where`` names its file in messages)."""
        if meta.get("kind") != cls.KIND:
            raise CheckpointError(f"{where} is not a {cls.KIND} state (it holds {meta.get('kind')!r})")
        saved = meta.get("fingerprint") or {}
        if fingerprint and saved and saved != fingerprint:
            raise CheckpointError(f"{where} was made by a different model ({saved}); this model is "
                                  f"{fingerprint}. Start a fresh state instead.")
        try:
            state = cls._build(meta.get("fields", {}), tensors)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where} lacks {exc}; the state is incomplete or from another version") from exc
        # fresh, aligned storage: BLAS kernels may round differently on the file buffer's offsets,
        # which a bit-exact resume would notice
        state = state.map_tensors(lambda t, d: t.clone())
        return state.to(dtype=dtype) if dtype is not None else state

    def save(self, path: str | Path, fingerprint: dict | None = None) -> None:
        """Write the state to one safetensors file (atomic). ``fingerprint`` names the model it
        belongs to; :meth:`load` refuses the file for any other model."""
        save_tensors(path, *self.to_tensors(fingerprint))

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=None, fingerprint: dict | None = None) -> "ModelState":
        """Read a state written by :meth:`save` (see :meth:`from_tensors` for the checks)."""
        tensors, meta = load_tensors(path, device)
        return cls.from_tensors(tensors, meta, dtype=dtype, fingerprint=fingerprint, where=f"state file {path}")


@dataclass
class EmptyState(ModelState):
    """The state of a model that carries nothing between calls but a token count."""

    KIND: ClassVar[str] = "empty-state"
    rows: torch.Tensor = batch_field(0)  # (B,) placeholder so rows can be counted and selected
    tokens: int = 0

    @classmethod
    def new(cls, batch_size: int, device=None) -> "EmptyState":
        return cls(rows=torch.zeros(batch_size, dtype=torch.long, device=device))

