"""Data pipeline: sources -> documents -> token shards -> windows.

``load_documents`` reads a split of any source, ``build_corpus`` tokenises it once into a
memory-mapped cache, ``WindowLoader`` cuts shuffled, resumable training windows from it.
"""

from hiermem.data.corpora import Document, available_corpora, corpus
from hiermem.data.sources import load_documents
from hiermem.data.splits import select_split, split_of
from hiermem.data.stream import StreamBatch, StreamLoader
from hiermem.data.tokenized import TokenizedCorpus, build_corpus, tokenizer_fingerprint
from hiermem.data.windows import WindowLoader, window_starts

__all__ = ["Document", "StreamBatch", "StreamLoader", "TokenizedCorpus", "WindowLoader", "available_corpora", "build_corpus", "corpus",
           "load_documents", "select_split", "split_of", "tokenizer_fingerprint", "window_starts"]
