"""Deterministic document-level splits by a stable hash of the document id.

A document's split depends on its id alone, so adding documents never moves the others.
"""

from __future__ import annotations

import hashlib

from hiermem.errors import DataError

SPLITS = ("train", "validation", "test")


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


def select_split(docs, split: str, validation: float = 0.1, test: float = 0.1):
    if split not in SPLITS and split != "all":
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or 'all'")
    if split == "all":
        return list(docs)
    chosen = [d for d in docs if split_of(d.id, validation, test) == split]
    if not chosen:
        raise DataError(f"split {split!r} is empty ({len(docs)} documents in all); change the split "
                        "fractions or add documents")
    return chosen
