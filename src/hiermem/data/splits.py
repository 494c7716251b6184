"""Deterministic document-level splits: by a stable hash of the document id, or by split files.

A document's hashed split depends on its id alone, so adding documents never moves the others.
Split files list document ids one per line; ``train`` may be left out, and then holds every
document not listed in another split file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from hiermem.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def check_split(split: str) -> None:
    if split not in SPLITS and split != "all":
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or 'all'")


def split_of(doc_id: str, validation: float = 0.1, test: float = 0.1) -> str:
    """'train', 'validation' or 'test' for a document id."""
    if validation < 0 or test < 0 or validation + test >= 1:
        raise DataError(f"validation ({validation}) and test ({test}) fractions must be >= 0 and sum below 1")
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def read_split_files(split_files: Mapping[str, str | Path]) -> dict[str, set[str]]:
    """Split name -> the set of ids listed in its file (one per line; blank lines ignored)."""
    listed: dict[str, set[str]] = {}
    owner: dict[str, str] = {}
    for name, file in split_files.items():
        if name not in SPLITS:
            raise DataError(f"split file given for unknown split {name!r}; use {', '.join(SPLITS)}")
        path = Path(file).expanduser()
        if not path.is_file():
            raise DataError(f"split file for {name!r} not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"split file {path} is not UTF-8 text ({exc}); list one document id per line") from exc
        ids = {line.strip() for line in lines if line.strip()}
        if not ids:
            raise DataError(f"split file {path} lists no document ids; list one id per line")
        for doc_id in ids:
            if doc_id in owner:
                raise DataError(f"document {doc_id!r} is listed in both the {owner[doc_id]!r} and the {name!r} "
                                f"split files ({path}); a document belongs to one split")
            owner[doc_id] = name
        listed[name] = ids
    return listed


def split_indices(ids: Sequence[str], split: str, validation: float = 0.1, test: float = 0.1,
                  split_files: Mapping[str, str | Path] | None = None, source: str | None = None) -> list[int]:
    """Positions of the documents of ``split`` among ``ids`` (all of them for ``split='all'``)."""
    check_split(split)
    where = f" of {source}" if source else ""
    if split == "all":
        if not ids:
            raise DataError(f"source{where} holds no documents")
        return list(range(len(ids)))
    if split_files:
        listed = read_split_files(split_files)
        if split in listed:
            chosen = [i for i, d in enumerate(ids) if d in listed[split]]
            unknown = listed[split].difference(ids)
            if unknown:
                log.warning("%d ids of the %r split file are not documents%s (e.g. %s)", len(unknown), split,
                            where, ", ".join(sorted(unknown)[:3]))
        elif split == "train":
            others = set().union(*listed.values())
            chosen = [i for i, d in enumerate(ids) if d not in others]
        else:
            raise DataError(f"no split file for {split!r}; split files were given for {', '.join(listed)}")
    else:
        chosen = [i for i, d in enumerate(ids) if split_of(d, validation, test) == split]
    if not chosen:
        hint = ("check that the split file lists the documents' ids" if split_files else
                "use split='all', change the split fractions, add documents, or pass split files")
        raise DataError(f"split {split!r}{where} is empty ({len(ids)} documents in all); {hint}")
    return chosen


def select_split(docs, split: str, validation: float = 0.1, test: float = 0.1,
                 split_files: Mapping[str, str | Path] | None = None, source: str | None = None) -> list:
    """The documents (anything with an ``id``) of ``split``; see :func:`split_indices`."""
    docs = list(docs)
    return [docs[i] for i in split_indices([d.id for d in docs], split, validation, test, split_files, source)]
