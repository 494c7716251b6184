"""Train, save and load tokenizers for models trained from scratch.

Types: ``bpe``, ``unigram``, ``char`` and ``word`` are trained with SentencePiece; ``byte`` needs
no training (ids 4..259 are the bytes 0..255). Every type shares the ids ``<pad>``=0, ``<unk>``=1,
``<s>``=2 (BOS), ``</s>``=3 (EOS); ``"\\n"`` is a piece of its own (id 4, not for ``byte``);
bpe/unigram/char fall back to the 256 byte pieces, so any UTF-8 text round-trips. Text is not
normalised and whitespace is kept (a space becomes ``▁`` and starts a new piece).

A saved folder is a Hugging Face tokenizer (``AutoTokenizer.from_pretrained(folder)`` works
offline) and holds ``tokenizer.json``, ``tokenizer_config.json``, the SentencePiece
``tokenizer.model`` and ``hiermem_tokenizer.json`` (type, options, sha256 of every file).
The Hugging Face tokenizer is the source of truth; it gives the SentencePiece ids exactly for
bpe and char. For unigram it does line by line, but SentencePiece sums float32 scores over a
whole text, so on long texts it sometimes picks a slightly worse path (the Hugging Face one
scores per word in float64); literal reserved strings (``<s>``, ``<0x41>``) holding characters
never seen in training also differ. For ``word`` SentencePiece merges runs of unknown words
and ignores the ``"\\n"`` piece, the Hugging Face tokenizer gives one ``<unk>`` per unknown
word and splits at newlines; ids of known words agree. Special tokens written in the text are
encoded as text (``split_special_tokens``), as SentencePiece does.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from hiermem.errors import CheckpointError, ConfigError, DataError, TrainingError
from hiermem.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPM_TYPES = ("bpe", "unigram", "char", "word")
TYPES = SPM_TYPES + ("byte",)
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
NEWLINE = "\n"
META_FILE, SPM_FILE, HF_FILE = "hiermem_tokenizer.json", "tokenizer.model", "tokenizer.json"
MAX_SENTENCE_CHARS = 2048  # long lines are cut (at a space when possible) into pieces this long
_RESERVED_SCORE = -1000.0  # unigram: reserved pieces lose against any path of seen characters


def min_vocab_size(type: str) -> int:
    """Smallest vocab_size a type accepts (specials, newline and byte pieces, plus one)."""
    check_type(type)
    return {"byte": 260, "word": len(SPECIALS) + 2}.get(type, len(SPECIALS) + 1 + 256 + 1)


def check_type(type: str) -> None:
    if type not in TYPES:
        raise ConfigError(f"unknown tokenizer type {type!r}; choose one of {', '.join(TYPES)}")


def check_options(type: str, vocab_size: int, character_coverage: float = 1.0) -> None:
    """ConfigError for options no training could use."""
    if type != "byte" and (not isinstance(vocab_size, int) or vocab_size < min_vocab_size(type)):
        raise ConfigError(f"vocab_size {vocab_size} is too small for a {type} tokenizer: use at least "
                          f"{min_vocab_size(type)} (4 specials, the newline{'' if type == 'word' else ', 256 bytes'} "
                          "and the pieces themselves)")
    if not 0.0 < character_coverage <= 1.0:
        raise ConfigError(f"character_coverage {character_coverage} must be in (0, 1]; 1.0 keeps every character")


def _sentences(texts: Iterable[str], max_chars: int, counter: list[int]) -> Iterator[str]:
    """Non-empty lines of the texts, lines longer than ``max_chars`` cut before a space when possible."""
    for n, text in enumerate(texts):
        if not isinstance(text, str):
            raise ConfigError(f"text {n} is a {type(text).__name__}, not a str")
        for line in text.split(NEWLINE):
            while line:
                cut = len(line) if len(line) <= max_chars else line.rfind(" ", 1, max_chars + 1)
                cut = max_chars if cut <= 0 else cut
                piece, line = line[:cut], line[cut:]
                counter[0] += 1
                yield piece


def _train_spm(texts: Iterable[str], type: str, vocab_size: int, character_coverage: float, seed: int,
               max_sentences: int) -> bytes:
    """Serialized SentencePiece model trained deterministically on ``texts``."""
    import sentencepiece as spm

    counter, out = [0], io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, MAX_SENTENCE_CHARS, counter), model_writer=out,
            model_type=type, vocab_size=vocab_size, character_coverage=character_coverage,
            byte_fallback=type != "word", hard_vocab_limit=type != "char", user_defined_symbols=[NEWLINE],
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, unk_surface=" \u2047 ",
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=max_sentences,
            max_sentence_length=4 * MAX_SENTENCE_CHARS + 16, train_extremely_large_corpus=False, minloglevel=2)
    except RuntimeError as exc:
        msg = str(exc)
        if counter[0] == 0:
            raise DataError("no text to train a tokenizer on: every text is empty") from exc
        if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
            raise ConfigError(f"vocab_size {m.group(1)} is too large for this corpus: a {type} tokenizer can "
                              f"learn at most {m.group(2)} pieces from it; use vocab_size <= {m.group(2)} "
                              "or train on more text") from exc
        if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
            raise ConfigError(f"vocab_size {m.group(1)} is too small: the corpus's characters alone need "
                              f"{m.group(2)} pieces; use vocab_size >= {m.group(2)} or a character_coverage "
                              "below 1.0") from exc
        raise TrainingError(f"SentencePiece could not train a {type} tokenizer: {msg}") from exc
    return out.getvalue()


def _spm_pieces(model: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a serialized SentencePiece model; types: 1 normal, 2 unk, 3 control,
    4 user-defined, 6 byte."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def _byte_pieces() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _backend(type: str, pieces: list[tuple[str, float, int]]):
    """The ``tokenizers.Tokenizer`` of a type; ``pieces`` as from :func:`_spm_pieces` (unused for byte)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if type == "byte":
        tok = Tokenizer(models.BPE({p: i for i, p in enumerate(SPECIALS + tuple(_byte_pieces()))}, [],
                                   unk_token="<unk>", byte_fallback=True))
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    else:
        if [p for p, _, _ in pieces[:5]] != [*SPECIALS, NEWLINE]:
            raise CheckpointError("the SentencePiece model does not start with <pad> <unk> <s> </s> \\n")
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        if type == "bpe":  # merges in the order of the merged piece's rank, as SentencePiece applies them
            normal = {p for p, _, t in pieces if t == 1}
            merges = [(p[:k], p[k:]) for p, _, t in pieces if t == 1
                      for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
            model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
        elif type == "unigram":
            scored = [(p, s if t == 1 else _RESERVED_SCORE) for p, s, t in pieces]
            model = models.Unigram(scored, unk_id=1, byte_fallback=True)
        elif type == "char":
            model = models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True)
        else:
            model = models.WordLevel(vocab, unk_token="<unk>")
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False,
                                   split_special_tokens=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_target(target: Path) -> None:
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / META_FILE).exists())):
        raise ConfigError(f"{target} exists and is not a tokenizer folder; choose another output or remove it")


def _publish_dir(tmp: Path, target: Path) -> None:
    """Rename a finished temp folder onto ``target``, replacing an older tokenizer folder there."""
    _check_target(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "t")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train_tokenizer(texts: Iterable[str] | None, output_dir: str | Path, type: str = "bpe", vocab_size: int = 8000,
                    character_coverage: float = 1.0, seed: int = 0, max_sentences: int = 0):
    """Train a tokenizer of ``type`` on ``texts``, save it into ``output_dir`` and return it loaded.

    The same texts and options give byte-identical files. ``vocab_size`` is exact for bpe,
    unigram and word, an upper bound for char and ignored for byte (fixed at 260; ``texts``
    unused). ``max_sentences`` > 0 trains on the first that many lines only. Raises ConfigError
    for bad options (including a vocab_size the corpus cannot fill), DataError for no text.
    """
    check_type(type)
    check_options(type, vocab_size, character_coverage)
    target = Path(output_dir).expanduser()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        options: dict = {"seed": seed, "max_sentences": max_sentences, "character_coverage": character_coverage}
        if type == "byte":
            backend, options = _backend("byte", []), {}
        else:
            model = _train_spm(texts if texts is not None else [], type, vocab_size, character_coverage, seed,
                               max_sentences)
            (tmp / SPM_FILE).write_bytes(model)
            backend = _backend(type, _spm_pieces(model))
        if type == "char" and backend.get_vocab_size() < vocab_size:
            log.info("the corpus has characters for %d ids only (vocab_size %d)", backend.get_vocab_size(), vocab_size)
        _wrap(backend).save_pretrained(str(tmp))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": FORMAT_VERSION, "type": type, "vocab_size": backend.get_vocab_size(),
                "requested_vocab_size": vocab_size if type != "byte" else 260, "options": options,
                "special_ids": dict(zip(("pad", "unk", "bos", "eos"), range(4))), "files": files}
        atomic_write_json(tmp / META_FILE, meta)
        _publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_tokenizer(target)


def _read_meta(folder: str | Path) -> tuple[Path, dict]:
    """(folder, hiermem_tokenizer.json contents) after checking every recorded file's sha256."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} not found; train one with `hiermem tokenizer train "
                              f"--output {folder}` or check the path")
    if not (folder / META_FILE).exists():
        raise CheckpointError(f"{folder} has no {META_FILE}, so it is not a tokenizer saved by hiermem; "
                              "train one with `hiermem tokenizer train`, or load a Hugging Face tokenizer folder "
                              "with transformers.AutoTokenizer")
    meta = read_json(folder / META_FILE)
    if not isinstance(meta, dict) or meta.get("type") not in TYPES or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{folder / META_FILE} is not a valid tokenizer description; retrain the tokenizer")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was saved by a newer hiermem (format {meta['format']}); upgrade hiermem")
    for name, sha in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the tokenizer folder; restore it or retrain the tokenizer")
        if _sha256(path) != sha:
            raise CheckpointError(f"{path} does not match the sha256 recorded in {META_FILE}: the file is corrupt, "
                                  "truncated or was edited; restore it or retrain the tokenizer")
    return folder, meta


def load_tokenizer(folder: str | Path):
    """The Hugging Face fast tokenizer saved by :func:`train_tokenizer` in ``folder``.

    Checks every file against its recorded sha256; raises CheckpointError naming the missing or
    corrupt file. ``tok.hiermem_info`` holds the contents of ``hiermem_tokenizer.json``.
    """
    from transformers import PreTrainedTokenizerFast

    folder, meta = _read_meta(folder)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # the Rust backend and transformers raise many types on bad files
        raise CheckpointError(f"could not load the tokenizer in {folder} ({HF_FILE}, tokenizer_config.json): "
                              f"{exc}; retrain the tokenizer") from exc
    if len(tok) != meta.get("vocab_size") or [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id,
                                               tok.eos_token_id] != [0, 1, 2, 3]:
        raise CheckpointError(f"{folder / HF_FILE} does not match {META_FILE} (vocabulary size or special ids); "
                              "retrain the tokenizer")
    tok.hiermem_info = meta
    return tok


def load_sentencepiece(folder: str | Path):
    """The SentencePiece processor of a saved folder (the training artefact; not for byte)."""
    import sentencepiece as spm

    folder, meta = _read_meta(folder)
    path = folder / SPM_FILE
    if meta["type"] == "byte" or not path.is_file():
        raise CheckpointError(f"{folder} holds no {SPM_FILE} (a {meta['type']} tokenizer has none)")
    try:
        return spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a bad proto
        raise CheckpointError(f"{path} is not a readable SentencePiece model ({exc}); retrain the tokenizer") from exc


def tokenizer_summary(tok) -> dict:
    """Type, vocabulary size and special ids of a tokenizer, for logs."""
    info = getattr(tok, "hiermem_info", None) or {}
    backend = getattr(tok, "backend_tokenizer", None)
    kind = info.get("type") or (type(backend.model).__name__.lower() if backend is not None else type(tok).__name__)
    return {"type": kind, "vocab_size": len(tok), "pad_id": tok.pad_token_id, "unk_id": tok.unk_token_id,
            "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
            "path": str(getattr(tok, "name_or_path", "") or "") or None}


def tokens_per_byte(tok, texts: Iterable[str], batch: int = 64) -> float:
    """Tokens per UTF-8 byte of ``texts`` (without special tokens): lower is better compression."""
    texts = list(texts)
    n_tokens = n_bytes = 0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        n_tokens += sum(map(len, tok(chunk, add_special_tokens=False)["input_ids"]))
        n_bytes += sum(len(t.encode()) for t in chunk)
    return n_tokens / max(n_bytes, 1)


def train_command(source: str = "shakespeare", output: str = "tokenizers/shakespeare-bpe-8k",
                  type: Literal["bpe", "unigram", "char", "word", "byte"] = "bpe", vocab_size: int = 8000,
                  split: str = "train", text_column: str = "text", max_documents: int | None = None,
                  character_coverage: float = 1.0) -> int:
    """Train a tokenizer on a data source and save it as a Hugging Face tokenizer folder.

    Args:
        source: built-in corpus name, .txt file or folder, table file, or hf:<dataset>.
        output: folder to write the tokenizer into (an older tokenizer there is replaced).
        type: bpe, unigram, char, word (SentencePiece) or byte (fixed 260 ids, no training).
        vocab_size: number of ids (bpe/unigram/char: >= 262, word: >= 6; at most this for char; byte: fixed 260).
        split: document split to train on: train, validation, test or all.
        text_column: column holding the text in table and hf: sources.
        max_documents: train on the first this many documents only (default: all).
        character_coverage: share of characters that get their own piece; the rarest fall back to bytes.
    """
    from hiermem.data import load_documents

    check_type(type)
    check_options(type, vocab_size, character_coverage)
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"max_documents {max_documents} must be at least 1 (or left out for all documents)")
    _check_target(Path(output).expanduser())
    docs = load_documents(source, split, text_column=text_column)[:max_documents]
    texts = [d.text for d in docs]
    tok = train_tokenizer(texts, output, type=type, vocab_size=vocab_size, character_coverage=character_coverage)
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"{type} tokenizer with {len(tok)} ids saved to {output}: {tokens_per_byte(tok, texts):.4f} tokens per "
          f"byte on {len(docs)} documents ({n_bytes / 1e6:.2f} MB) of {source} ({split})")
    return 0


__all__ = ["TYPES", "check_options", "load_sentencepiece", "load_tokenizer", "min_vocab_size", "tokenizer_summary",
           "tokens_per_byte", "train_command", "train_tokenizer"]


def save_tokenizer(tok, target: Path) -> None:
    """Save ``tok`` so :func:`read_tokenizer` loads it: a hiermem tokenizer (``hiermem_info``) gets
    its ``hiermem_tokenizer.json`` with fresh file hashes (and its SentencePiece model when the
    folder it came from still has it); any other tokenizer is saved the Hugging Face way."""
    target, info = Path(target), getattr(tok, "hiermem_info", None)
    source = Path(str(getattr(tok, "name_or_path", "") or ".")) / SPM_FILE
    spm = source.read_bytes() if info and SPM_FILE in info.get("files", {}) and source.is_file() else None
    if target.exists():  # read before: the tokenizer may come from this very folder
        shutil.rmtree(target)
    tok.save_pretrained(str(target))
    if info is None:
        return
    if spm is not None:
        (target / SPM_FILE).write_bytes(spm)
    files = {p.name: _sha256(p) for p in sorted(target.iterdir()) if p.is_file() and p.name != META_FILE}
    atomic_write_json(target / META_FILE, {**info, "files": files})


def read_tokenizer(folder: Path):
    """The tokenizer saved in ``folder`` (hiermem or Hugging Face), or None when there is none."""
    if (folder / META_FILE).exists():
        return load_tokenizer(folder)
    if not folder.is_dir():
        log.warning("%s holds no tokenizer: the model loads without one (set model.tokenizer)", folder.parent)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types on bad folders
        raise CheckpointError(f"could not load the tokenizer in {folder}: {exc}") from exc


# --- bytes of the text of scored tokens (bits per byte) ----------------------------------------------
MAX_SHIFT = 8  # tokens a boundary may move to keep a character's bytes together


def segment_bytes(tokenizer, ids, segment_length: int) -> list[int]:
    """UTF-8 bytes of the text of tokens 1..T-1 of ``ids`` (T,) by segment index (token t -> t // L), in O(T).

    bytes(s, e) = |decode(ids[a:e])| - |decode(ids[a:s])| with a = s - 1: one token of context, as
    SentencePiece-style decoders strip the leading space of a slice's first token. A boundary that
    splits a character's bytes between tokens (byte fallback) moves right to the character's end and
    the context token left to its start, so the counts sum to |decode(ids)| - |decode(ids[:1])|.
    Special tokens count as their text (``skip_special_tokens=False``).
    """
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    T, L = len(ids), segment_length
    if T < 2:
        return []

    def text(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b], skip_special_tokens=False) if b > a else ""

    out, anchor, start = [], 0, 1
    start_bytes = len(text(0, 1).encode())  # |decode(ids[anchor:start])|
    for j in range((T - 1) // L + 1):
        end = max(min((j + 1) * L, T), start)
        whole = text(anchor, end)
        for _ in range(MAX_SHIFT):  # a trailing U+FFFD: the slice ends inside a character
            if end >= T or not whole.endswith("\ufffd"):
                break
            end += 1
            whole = text(anchor, end)
        out.append(len(whole.encode()) - start_bytes)
        if end >= T:
            continue
        # the next slice's context: the last token that starts a character, at most MAX_SHIFT back
        new = next((p for p in range(end - 1, max(anchor, end - 1 - MAX_SHIFT) - 1, -1)
                    if not text(anchor, p).endswith("\ufffd")), end - 1)
        anchor, start = new, end
        start_bytes = len(text(anchor, start).encode())
    return out


def token_bytes(tokenizer, ids) -> list[int]:
    """UTF-8 bytes of each scored token 1..T-1 of ``ids`` (T,), aligned with a per-token NLL (T-1,)
    (``hiermem.evaluation.model_nll``); :func:`segment_bytes` with L = 1 (a character split between
    tokens counts at its last)."""
    return segment_bytes(tokenizer, ids, 1)[1:]
