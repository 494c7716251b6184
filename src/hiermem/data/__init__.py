"""Data pipeline: sources -> documents -> token shards -> windows."""

from hiermem.data.corpora import Document, available_corpora, corpus
from hiermem.data.splits import select_split, split_of

__all__ = ["Document", "available_corpora", "corpus", "select_split", "split_of"]
