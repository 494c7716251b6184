"""Trained tokenizers: determinism, SentencePiece <-> Hugging Face equivalence, save/load, errors, CLI."""

import hashlib
import json
import shutil

import pytest
from transformers import AutoTokenizer

from hiermem.data import load_documents
from hiermem.errors import CheckpointError, ConfigError, DataError
from hiermem.tokenizers import (load_sentencepiece, load_tokenizer, tokenizer_summary, train_command,
                                train_tokenizer)

PROBE = "Hello  world,\nCafé au lait — 漢字 and 😀!\n\n   indented\tline  \ntrailing spaces   "
LINES = ["First Lord. Madam, my lord your son was gone.", "  two  spaces  ", "naïve café 漢字 😀 end", "x\ty"]


@pytest.fixture(scope="module")
def corpus():
    text = load_documents("shakespeare", "train")[0].text[:50_000]
    return [text[:25_000], text[25_000:]]


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "bpe"
    train_tokenizer(corpus, folder, type="bpe", vocab_size=400)
    return folder


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_training_is_deterministic(corpus, tmp_path):
    for kind in ("bpe", "unigram"):
        a = train_tokenizer(corpus, tmp_path / f"{kind}-a", type=kind, vocab_size=400)
        b = train_tokenizer(corpus, tmp_path / f"{kind}-b", type=kind, vocab_size=400)
        files = sorted(p.name for p in (tmp_path / f"{kind}-a").iterdir())
        assert files == ["hiermem_tokenizer.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
        assert sorted(p.name for p in (tmp_path / f"{kind}-b").iterdir()) == files
        for name in files:
            assert (tmp_path / f"{kind}-a" / name).read_bytes() == (tmp_path / f"{kind}-b" / name).read_bytes(), name
        assert ids(a, PROBE) == ids(b, PROBE)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_hf_tokenizer_matches_sentencepiece_bpe(bpe_dir):
    auto = AutoTokenizer.from_pretrained(str(bpe_dir), local_files_only=True)
    tok, sp = load_tokenizer(bpe_dir), load_sentencepiece(bpe_dir)
    for text in [PROBE, *LINES, "literal <s> and </s> and <0x41> stay text", "\n\n", " "]:
        assert ids(auto, text) == sp.encode(text) == ids(tok, text), text
        assert auto.decode(ids(auto, text), skip_special_tokens=True) == text
        assert sp.decode(sp.encode(text)) == text
    assert (auto.pad_token_id, auto.unk_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2, 3)
    assert auto.convert_ids_to_tokens(ids(auto, "a\nb")) == ["a", "\n", "b"]
    assert auto.decode([2, *ids(auto, "Hi there"), 3, 0], skip_special_tokens=True) == "Hi there"
    assert auto.chat_template is None and len(auto) == 400
    assert tokenizer_summary(tok) == {"type": "bpe", "vocab_size": 400, "pad_id": 0, "unk_id": 1, "bos_id": 2,
                                      "eos_id": 3, "path": str(bpe_dir)}
    assert tokenizer_summary(auto)["type"] == "bpe"


@pytest.mark.parametrize("kind,vocab", [("unigram", 400), ("char", 1000), ("word", 300), ("byte", 8000)])
def test_each_type_trains_loads_and_round_trips(corpus, tmp_path, kind, vocab):
    tok = train_tokenizer(corpus, tmp_path / kind, type=kind, vocab_size=vocab)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / kind), local_files_only=True)
    again = load_tokenizer(tmp_path / kind)
    assert ids(auto, PROBE) == ids(tok, PROBE) == ids(again, PROBE)
    assert tokenizer_summary(again)["type"] == kind and tok.bos_token_id == 2 and tok.eos_token_id == 3
    if kind == "word":  # whole words: unknown words become one <unk> each, decoding drops them
        sp = load_sentencepiece(tmp_path / kind)
        known = "the king and the lord"
        assert ids(auto, known) == sp.encode(known) and auto.decode(ids(auto, known)) == known
        assert ids(auto, "the zyxwv  lord") == ids(auto, "the") + [1, auto.convert_tokens_to_ids("▁"),
                                                                   auto.convert_tokens_to_ids("▁lord")]
        assert auto.decode(ids(auto, "the\nzyxwv"), skip_special_tokens=True) == "the\n"
        return
    assert auto.decode(ids(auto, PROBE), skip_special_tokens=True) == PROBE
    if kind == "byte":
        assert len(tok) == 260 and ids(tok, PROBE) == [b + 4 for b in PROBE.encode()]
        assert not (tmp_path / kind / "tokenizer.model").exists()
        return
    sp = load_sentencepiece(tmp_path / kind)
    for line in [*LINES, *PROBE.split("\n")]:  # unigram: exact line by line (spm sums float32 on long texts)
        assert ids(auto, line) == sp.encode(line), line
    if kind == "char":
        assert len(tok) < 1000 and all(len(auto.decode([i])) == 1 for i in ids(auto, "Madam, my lord"))


def test_vocab_size_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"too large for this corpus.*vocab_size <= \d+"):
        train_tokenizer(corpus, tmp_path / "big", type="bpe", vocab_size=50_000)
    with pytest.raises(ConfigError, match=r"need \d+ pieces; use vocab_size >= \d+"):
        train_tokenizer(corpus, tmp_path / "small", type="unigram", vocab_size=270)
    with pytest.raises(ConfigError, match="at least 262"):
        train_tokenizer(corpus, tmp_path / "tiny", type="bpe", vocab_size=100)
    with pytest.raises(ConfigError, match="unknown tokenizer type"):
        train_tokenizer(corpus, tmp_path / "x", type="wordpiece")
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "\n\n"], tmp_path / "empty", type="bpe", vocab_size=300)
    assert not list(tmp_path.iterdir())  # failed trainings leave nothing behind


def test_corrupt_or_missing_files(bpe_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="hiermem_tokenizer.json"):
        load_tokenizer(tmp_path / "plain")
    for name, garbage in [("tokenizer.json", b"\x00\xffgarbage"), ("tokenizer.model", b"\x8a\x13\x07junk"),
                          ("tokenizer_config.json", b"{")]:
        folder = tmp_path / name
        shutil.copytree(bpe_dir, folder)
        (folder / name).write_bytes(garbage)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_tokenizer(folder)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_sentencepiece(folder)
        # garbage with a matching sha256 still gives a CheckpointError, not a raw library error
        meta = json.loads((folder / "hiermem_tokenizer.json").read_text())
        meta["files"][name] = hashlib.sha256(garbage).hexdigest()
        (folder / "hiermem_tokenizer.json").write_text(json.dumps(meta))
        loader = load_sentencepiece if name == "tokenizer.model" else load_tokenizer
        with pytest.raises(CheckpointError, match="tokenizer"):
            loader(folder)
    truncated = tmp_path / "truncated"
    shutil.copytree(bpe_dir, truncated)
    data = (truncated / "tokenizer.json").read_bytes()
    (truncated / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*sha256"):
        load_tokenizer(truncated)
    (truncated / "tokenizer.json").write_bytes(data)
    assert len(load_tokenizer(truncated)) == 400
    (truncated / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.model is missing"):
        load_tokenizer(truncated)


def test_output_folder_rules(corpus, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a tokenizer folder"):
        train_tokenizer(corpus, tmp_path / "other", type="byte")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    train_tokenizer(corpus, tmp_path / "tok", type="byte")
    tok = train_tokenizer(corpus, tmp_path / "tok", type="char", vocab_size=400)  # replaces the older tokenizer
    assert tokenizer_summary(load_tokenizer(tmp_path / "tok"))["type"] == "char" and len(tok) < 400


def test_train_command_end_to_end(tmp_path, capsys):
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40 + "Ünïcödé 漢字 😀\n")
    (data / "b.txt").write_text("Pack my box with five dozen liquor jugs.\n  Indented  line.\n" * 40)
    out = tmp_path / "tok"
    assert train_command(source=str(data), output=str(out), type="bpe", vocab_size=300, split="all") == 0
    printed = capsys.readouterr().out
    assert "300 ids" in printed and "tokens per byte" in printed and "2 documents" in printed
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = (data / "a.txt").read_text()
    assert tok.decode(ids(tok, text)) == text and len(ids(tok, text)) < len(text.encode())
    # arguments are checked before any data is read
    with pytest.raises(ConfigError, match="vocab_size"):
        train_command(source=str(tmp_path / "missing"), output=str(tmp_path / "x"), vocab_size=10)
    with pytest.raises(ConfigError, match="character_coverage"):
        train_command(source=str(tmp_path / "missing"), output=str(tmp_path / "x"), character_coverage=0)
    with pytest.raises(ConfigError, match="max_documents"):
        train_command(source=str(tmp_path / "missing"), output=str(tmp_path / "x"), max_documents=0)
    with pytest.raises(DataError):
        train_command(source=str(tmp_path / "missing"), output=str(tmp_path / "x"))
