"""Tokenise documents once into a memory-mapped on-disk cache and reuse it.

A cache entry is a folder ``cache_dir()/tokens/<key>`` holding ``tokens.bin`` (little-endian
uint32, every document back to back), ``offsets.bin`` (int64, n_docs + 1 document starts),
``doc_ids.json`` and ``meta.json``. The key hashes the tokenizer's full serialisation, the
source's identity (sizes and mtimes of local files, else a hash of the documents' content),
the options and the split. Entries are written in a temporary folder and renamed into place,
so a reader never sees a half-written entry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hiermem.data.corpora import Document
from hiermem.data.sources import load_documents, source_files
from hiermem.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<i8")
_STALE_TMP_SECONDS = 24 * 3600


class TokenizedCorpus:
    """Token ids of a list of documents, back to back, with document boundaries.

    ``tokens``: (num_tokens,) uint32, memory-mapped when on disk; ``offsets``: (n_docs + 1,)
    int64, document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``; ``doc_ids``: one id per document.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, doc_ids: Sequence[str], meta: dict | None = None,
                 path: Path | None = None):
        if offsets.ndim != 1 or len(offsets) != len(doc_ids) + 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise DataError(f"inconsistent corpus{f' at {path}' if path else ''}: {len(doc_ids)} ids, "
                            f"{len(offsets)} offsets, {len(tokens)} tokens")
        if np.any(np.diff(offsets) < 0):
            raise DataError(f"corpus{f' at {path}' if path else ''} has decreasing document offsets")
        self.tokens = tokens
        self.offsets = offsets
        self.doc_ids = list(doc_ids)
        self.meta = dict(meta or {})
        self.path = path

    @classmethod
    def from_token_lists(cls, documents: Sequence[Sequence[int]], doc_ids: Sequence[str] | None = None,
                         source: str = "in-memory") -> TokenizedCorpus:
        """An in-memory corpus from token-id sequences (tests, small programmatic data)."""
        lengths = np.array([len(d) for d in documents], dtype=OFFSET_DTYPE)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(OFFSET_DTYPE)
        tokens = (np.concatenate([np.asarray(d, dtype=TOKEN_DTYPE) for d in documents])
                  if len(documents) else np.zeros(0, TOKEN_DTYPE))
        ids = list(doc_ids) if doc_ids is not None else [f"{source}:{i}" for i in range(len(documents))]
        return cls(tokens, offsets, ids, {"source": source, "num_tokens": int(offsets[-1])})

    @classmethod
    def open(cls, path: str | Path) -> TokenizedCorpus:
        """Open a cache folder written by :func:`build_corpus` (tokens memory-mapped, read-only)."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            doc_ids = json.loads((path / "doc_ids.json").read_text())
            offsets = np.fromfile(path / "offsets.bin", dtype=OFFSET_DTYPE)
            n = int(meta["num_tokens"])
            if meta.get("format") != FORMAT_VERSION or (path / "tokens.bin").stat().st_size != n * TOKEN_DTYPE.itemsize:
                raise ValueError("format version or tokens.bin size does not match meta.json")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"token cache {path} is unreadable or corrupt ({exc}); delete the folder and it will "
                            "be rebuilt") from exc
        tokens = np.memmap(path / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(n,)) if n else \
            np.zeros(0, TOKEN_DTYPE)
        return cls(tokens, offsets, doc_ids, meta, path)

    @property
    def source(self) -> str:
        """Human-readable origin, e.g. ``shakespeare [train]`` (used in error messages)."""
        src = self.meta.get("source", "in-memory")
        return f"{src} [{self.meta['split']}]" if self.meta.get("split") else src

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """(n_docs,) int64 token count of each document."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view into ``tokens``)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for a corpus of {len(self)} documents")
        i %= len(self)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"TokenizedCorpus({self.source!r}, {len(self)} documents, {self.num_tokens} tokens)"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides a tokenizer's output (serialised model, normaliser, specials)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def content_fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def _source_identity(source: str, options: dict) -> dict | None:
    """Identity of a local source from file stats (no reading), or None when content must be hashed."""
    files = source_files(source)
    if files is None:
        return None
    ident = {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    if options.get("split_files"):
        ident["split_files"] = {k: hashlib.sha256(Path(v).expanduser().read_bytes()).hexdigest()
                                for k, v in sorted(options["split_files"].items())}
    return ident


def _load_options(options: dict) -> dict:
    """``options`` completed with load_documents' defaults; TypeError on unknown names."""
    sig = inspect.signature(load_documents)
    bound = sig.bind("source", **options)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("source", "split")}


def _write_corpus(folder: Path, docs: Sequence[Document], tokenizer, eos: int | None, meta: dict,
                  batch_chars: int = 1 << 22) -> None:
    """Tokenise ``docs`` in batches of about ``batch_chars`` characters into ``folder``."""
    offsets, n, max_id = [0], 0, -1
    with open(folder / "tokens.bin", "wb") as fh:
        i = 0
        while i < len(docs):
            j, size = i, 0
            while j < len(docs) and (j == i or size + len(docs[j].text) <= batch_chars):
                size += len(docs[j].text)
                j += 1
            enc = tokenizer([d.text for d in docs[i:j]], add_special_tokens=False, verbose=False,
                            return_attention_mask=False)["input_ids"]
            for ids in enc:
                arr = np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64)
                if arr.size:
                    max_id = max(max_id, int(arr.max()))
                fh.write(arr.astype(TOKEN_DTYPE).tobytes())
                n += arr.size
                offsets.append(n)
            i = j
    np.asarray(offsets, dtype=OFFSET_DTYPE).tofile(folder / "offsets.bin")
    (folder / "doc_ids.json").write_text(json.dumps([d.id for d in docs]))
    meta.update(num_tokens=n, num_documents=len(docs), max_token_id=max_id)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp folder into place; if another process won the race, keep theirs."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(root: Path) -> None:
    """Drop temp folders left by killed builds (older than a day, so no live build is touched)."""
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


def build_corpus(source: str, tokenizer, split: str = "train", *, add_eos: bool = True, cache: bool = True,
                 rebuild: bool = False, cache_root: str | Path | None = None, **load_options) -> TokenizedCorpus:
    """Tokenise the documents of ``source``/``split`` once and return them as a :class:`TokenizedCorpus`.

    ``load_options`` are :func:`load_documents`'s keyword options. ``add_eos`` appends the
    tokenizer's EOS id to each document (marks the end when windows straddle documents).
    With ``cache`` (default) the tokens live in ``cache_root`` (default
    ``hiermem.backbones.cache_dir()/tokens``) and later calls with the same tokenizer, source
    files, options and split reuse them; ``rebuild`` forces re-tokenising. ``cache=False``
    builds in memory and writes nothing.
    """
    from hiermem.backbones import cache_dir

    options = _load_options(load_options)
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        log.warning("tokenizer %s has no EOS token: documents are stored without an end marker",
                    getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    docs = None
    identity = _source_identity(source, options)
    if identity is None:
        docs = load_documents(source, split, **options)
        identity = {"content": content_fingerprint(docs)}
    meta = {"format": FORMAT_VERSION, "source": source, "split": split, "add_eos": add_eos, "eos_token_id": eos,
            "options": options, "source_identity": identity,
            "tokenizer": {"class": type(tokenizer).__name__, "name_or_path": getattr(tokenizer, "name_or_path", ""),
                          "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}}
    key_payload = {k: meta[k] for k in ("format", "source", "split", "add_eos", "options", "source_identity")}
    key_payload["tokenizer"] = meta["tokenizer"]["fingerprint"]
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = Path(cache_root) if cache_root is not None else cache_dir() / "tokens"
    target = root / key
    if cache and not rebuild and (target / "meta.json").exists():
        try:
            corpus = TokenizedCorpus.open(target)
            log.info("using cached tokens %s: %d documents, %d tokens", target, len(corpus), corpus.num_tokens)
            return corpus
        except DataError as exc:
            log.warning("%s; rebuilding it", exc)
    if docs is None:
        docs = load_documents(source, split, **options)
    t0 = time.perf_counter()
    log.info("tokenising %d documents of %s [%s]", len(docs), source, split)
    if not cache:
        with tempfile.TemporaryDirectory(prefix="hiermem-tokens-") as tmp:
            _write_corpus(Path(tmp), docs, tokenizer, eos, meta)
            corpus = TokenizedCorpus.open(tmp)
            corpus = TokenizedCorpus(np.array(corpus.tokens), corpus.offsets, corpus.doc_ids, corpus.meta)
    else:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            meta["key"] = key
            _write_corpus(tmp, docs, tokenizer, eos, meta)
            _publish(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        corpus = TokenizedCorpus.open(target)
    log.info("tokenised %d documents into %d tokens in %.1f s%s", len(corpus), corpus.num_tokens,
             time.perf_counter() - t0, f" ({target})" if cache else "")
    return corpus
