"""Bits per byte: summed NLL over ln 2 times the UTF-8 bytes of the scored text, exact byte counts by
segment for any tokenizer, and figures comparable across tokenizers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import ConfigError
from hiermem.evaluation import (NLLTally, TokenDocument, evaluate_perplexity, score_model, segment_bytes,
                                token_bytes)
from hiermem.evaluation.report import perplexity_rows, perplexity_table
from hiermem.models.base import HiermemModel, lm_output
from hiermem.models.state import EmptyState
from hiermem.tokenizers import train_tokenizer

TEXT = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
        "JULIET. O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.\n"
        "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.\n")
UNSEEN = "naïve café — déjà vu, 😀 ünïcödé ∑ 東京 "  # characters the bpe never saw: byte fallback


class Bigram(HiermemModel):
    """A minimal protocol model: embedding + linear head, no state."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = type("Cfg", (), {"model_type": "bigram"})()
        self.emb, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def init_state(self, batch_size=1):
        return EmptyState.new(batch_size)

    def forward(self, input_ids, state=None, labels=None, return_logits=True, return_token_nll=False):
        logits = self.head(self.emb(input_ids))
        return lm_output(logits, input_ids, labels, state or self.init_state(input_ids.shape[0]), return_logits,
                         return_token_nll)


class TableTokenizer:
    """decode = concatenation of fixed strings (so the bytes of every token are known by hand)."""

    PIECES = ["a", "é", "€", " b", "😀", "\n"]  # 1, 2, 3, 2, 4, 1 UTF-8 bytes

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids)


class StripLeadingSpace:
    """A SentencePiece-style decoder: the leading space of a slice's first token is dropped."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text[1:] if text.startswith(" ") else text


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"byte": train_tokenizer(None, root / "byte", type="byte"),
            "bpe": train_tokenizer([TEXT * 3], root / "bpe", type="bpe", vocab_size=400)}


def naive_one_token_context(tok, ids, L):
    """The plain formula at every boundary (no care for characters split between tokens)."""
    def n(a, b):
        return len(tok.decode(ids[a:b], skip_special_tokens=False).encode())
    bounds = [1] + [j * L for j in range(1, (len(ids) - 1) // L + 1)] + [len(ids)]
    return [n(s - 1, e) - n(s - 1, s) for s, e in zip(bounds, bounds[1:])]


def test_tally_bpb_is_summed_nll_over_ln2_bytes():
    tally = NLLTally(segment_length=4)
    a, b = torch.rand(10), torch.rand(5)  # tokens 1..10 -> segments 0,0,0,1,1,1,1,2,2,2; 1..5 -> 0,0,0,1,1
    tally.add(a, [5, 9, 4])
    tally.add(b, [3, 2])
    total = float(torch.cat([a, b]).double().sum())
    assert tally.bytes == [8, 11, 4]
    assert tally.summary()["bpb"] == pytest.approx(total / (math.log(2) * 23))
    assert tally.summary()["bytes"] == 23
    seg1 = float(torch.cat([a[3:7], b[3:5]]).double().sum())
    assert tally.by_segment()[1]["bpb"] == pytest.approx(seg1 / (math.log(2) * 11))
    tally.add(torch.rand(3))  # a document without bytes: bits per byte unknown from then on
    assert "bpb" not in tally.summary() and "bpb" not in tally.by_segment()[0]
    with pytest.raises(ValueError):
        NLLTally(4).add(torch.rand(10), [1, 2])


def test_bpb_of_a_model_by_hand():
    """Stub tokenizer with known bytes per token; NLL from the model's logits directly."""
    tok, model = TableTokenizer(), Bigram(6).eval()
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 4, 3])  # 11 tokens, 10 scored
    res = evaluate_perplexity({"model": model}, None, [TokenDocument("d", ids)], ["model"], segment_length=4,
                              tokenizer=tok)
    with torch.no_grad():
        nll = F.cross_entropy(model.head(model.emb(ids[:-1])), ids[1:], reduction="none").double()
    # scored tokens 1..10 by segment (t // 4): é € ' b' | 😀 \n a é | € 😀 ' b' -> bytes 2 3 2 | 4 1 1 2 | 3 4 2
    by_hand = [7, 8, 9]
    m = res.to_dict()["methods"]["model"]
    assert [r["bytes"] for r in m["by_segment"]] == by_hand and m["bytes"] == 24
    assert token_bytes(tok, ids) == [2, 3, 2, 4, 1, 1, 2, 3, 4, 2]
    assert m["bpb"] == pytest.approx(float(nll.sum()) / (math.log(2) * 24), rel=1e-6)
    for r, (s, e), n in zip(m["by_segment"], [(0, 3), (3, 7), (7, 10)], by_hand):
        assert r["bpb"] == pytest.approx(float(nll[s:e].sum()) / (math.log(2) * n), rel=1e-6)
    assert res.settings["bytes_scored"] == 24 and res.documents[0]["bpb"]["model"] == pytest.approx(m["bpb"])
    rows = perplexity_rows(res.to_dict())
    assert rows[0]["bpb"] == m["bpb"] and [r["bytes"] for r in rows[1:]] == by_hand
    table = perplexity_table(res.to_dict())
    assert table.splitlines()[0].split()[:3] == ["method", "ppl", "bpb"] and "Bits per byte" in table
    with pytest.raises(ConfigError, match="unknown perplexity method.*'chunks'.*choose among model"):
        evaluate_perplexity({"model": model}, None, [TokenDocument("d", ids)], ["chunks"], segment_length=4)


@pytest.mark.parametrize("kind,text", [("bpe", TEXT), ("bpe", TEXT + UNSEEN * 2), ("byte", TEXT + UNSEEN * 2)])
@pytest.mark.parametrize("L", [1, 3, 7, 64])
def test_segment_bytes_sum_exactly(tokenizers, kind, text, L):
    """Per-segment bytes sum to |decode(ids)| - |decode(ids[:1])| for a SentencePiece-style decoder that
    strips leading spaces, and when boundaries split a character's bytes between tokens."""
    tok = StripLeadingSpace(tokenizers[kind])
    ids = tokenizers[kind](text, add_special_tokens=False)["input_ids"]
    exact = len(tok.decode(ids).encode()) - len(tok.decode(ids[:1]).encode())
    got = segment_bytes(tok, torch.tensor(ids), L)
    assert len(got) == (len(ids) - 1) // L + 1 and min(got) >= 0
    assert sum(got) == exact
    per_token = token_bytes(tok, torch.tensor(ids))  # aligned with the NLL of tokens 1..T-1
    assert len(per_token) == len(ids) - 1 and sum(per_token) == exact
    # the test can fail: without context a slice loses its leading space ...
    bounds = [1] + [j * L for j in range(1, (len(ids) - 1) // L + 1)] + [len(ids)]
    if kind == "bpe" and L < 64:
        assert sum(len(tok.decode(ids[s:e]).encode()) for s, e in zip(bounds, bounds[1:])) != exact
    # ... and with one token of context a byte-split character poisons the decoded slice
    if kind == "byte" and L in (3, 7):
        assert sum(naive_one_token_context(tok, ids, L)) != exact


def test_bpb_comparable_across_tokenizers(tokenizers):
    """An untrained Transformer predicts ~uniformly: bpb ~ log2(V) * tokens / bytes for each tokenizer."""
    from hiermem.models.transformer import Transformer, TransformerConfig

    text = TEXT * 4
    figures = {}
    for kind, tok in tokenizers.items():
        model = Transformer(TransformerConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                              context_length=64)).eval()
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        summary = score_model(model, [TokenDocument("d", ids)], 32, tok).summary()
        assert summary["bytes"] == len(text.encode()) - len(tok.decode(ids[:1]).encode())  # all but token 0
        expected = math.log2(len(tok)) * summary["tokens"] / summary["bytes"]
        assert summary["bpb"] == pytest.approx(expected, rel=0.05)
        figures[kind] = (summary["bpb"], summary["tokens"])
    assert figures["bpe"][1] < 0.6 * figures["byte"][1]  # bpe: fewer tokens, each carrying more bits
    assert figures["bpe"][0] < figures["byte"][0] < 1.05 * math.log2(260)
