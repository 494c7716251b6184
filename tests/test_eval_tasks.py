"""Recall-task generators (deterministic, exact lengths, needle where it says), answering and scoring."""

import pytest
import torch

from hiermem.errors import ConfigError, DataError
from hiermem.evaluation import (extract_answer, haystack_pool, hmt_greedy, needle_samples, passkey_samples,
                                run_recall, sliding_greedy)
from hiermem.evaluation.tasks import summarize
from hiermem.models.hmt import HMTDecoder
from tiny import random_ids, tiny_backbone, tiny_hmt, tiny_tokenizer

TEXT = ("ACT I. SCENE I. Verona. A public place.\nEnter SAMPSON and GREGORY, armed with swords and bucklers.\n"
        "SAMPSON. Gregory, on my word, we'll not carry coals.\nGREGORY. No, for then we should be colliers.\n") * 12


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=False)


def test_passkey_is_deterministic_exact_length_and_hides_the_key(tok):
    a = passkey_samples(tok, lengths=(300, 700), samples=3, seed=5)
    assert a == passkey_samples(tok, lengths=(300, 700), samples=3, seed=5)
    assert [s.answer for s in a] != [s.answer for s in passkey_samples(tok, (300, 700), 3, seed=6)]
    assert [s.length for s in a] == [300] * 3 + [700] * 3
    for s in a:
        assert len(s.ids) == s.length and 0 <= s.depth < 1 and len(s.answer) == 5
        text = tok.decode(list(s.ids))
        assert tok.decode(list(s.ids[s.needle_at:])).startswith(f" The pass key is {s.answer}.")
        assert text.count(s.answer) == 2 and text.endswith("The pass key is")
        # the key sits where its depth says, within one filler group
        assert abs(s.needle_at / s.length - s.depth) < 0.2


def test_needle_uses_real_text_and_is_deterministic(tok):
    pool = haystack_pool(tok, [torch.tensor(tok(TEXT)["input_ids"])])
    a = needle_samples(tok, pool, lengths=(400, 900), samples=2, seed=1)
    assert a == needle_samples(tok, pool, lengths=(400, 900), samples=2, seed=1)
    for s in a:
        assert len(s.ids) == s.length
        text = tok.decode(list(s.ids))
        assert "SAMPSON" in text or "GREGORY" in text
        needle = tok.decode(list(s.ids[s.needle_at:]))
        assert needle.startswith(" The special magic number for ") and f" is {s.answer}." in needle
        assert tok.decode([s.ids[s.needle_at - 1]]) == "\n"  # the needle starts a line
    with pytest.raises(DataError, match="haystack"):
        needle_samples(tok, pool[:500], lengths=(900,), samples=1)


def test_bad_lengths_are_refused(tok):
    with pytest.raises(ConfigError, match="at least"):
        passkey_samples(tok, lengths=(100,), samples=1)
    with pytest.raises(ConfigError, match="samples"):
        passkey_samples(tok, lengths=(500,), samples=0)


def test_extract_answer():
    assert extract_answer(" 12345. Remember") == "12345"
    assert extract_answer(" is 9 and 8") == "9"
    assert extract_answer("no digits") is None


def test_sliding_greedy_equals_hf_generate_within_the_window():
    model = tiny_backbone("llama")
    ids = random_ids(1, 12)[0]
    ours = sliding_greedy(model, ids, window=64, max_new_tokens=6)
    ref = model.generate(ids[None], max_new_tokens=6, do_sample=False, min_new_tokens=6,
                         pad_token_id=0)[0, 12:].tolist()
    assert ours == ref
    # past the window only the last tokens matter
    longer = torch.cat([random_ids(1, 30, seed=9)[0], ids[-8:]])
    assert sliding_greedy(model, longer, window=8, max_new_tokens=3) == sliding_greedy(model, ids[-8:], 8, 3)


def test_hmt_greedy_equals_token_by_token_decoding():
    """Reading whole segments with forward() then decoding == feeding everything to a fresh decoder."""
    model = tiny_hmt("llama")
    ids = random_ids(1, 16 * 3 + 5)[0]
    ours = hmt_greedy(model, ids, max_new_tokens=5)
    dec = HMTDecoder(model)
    logits, ref = dec.feed(ids[None]), []
    for _ in range(5):
        tok = logits.argmax(-1)
        ref.append(int(tok))
        logits = dec.feed(tok[:, None])
    assert ours == ref


def test_run_recall_scores_and_summarises(tok):
    samples = passkey_samples(tok, lengths=(300, 500), samples=2, seed=0)

    def oracle(ids, n):  # reads the key out of the prompt: always right
        text = tok.decode(ids.tolist())
        return tok(" " + text.split("The pass key is ")[1].split(".")[0])["input_ids"][:n]

    res = run_recall(samples, {"oracle": oracle, "silent": lambda ids, n: []}, tok)
    s = res["summary"]["passkey"]
    assert s["oracle"]["accuracy"] == 1.0 and s["silent"]["accuracy"] == 0.0
    assert s["oracle"]["by_length"] == {300: {"accuracy": 1.0, "samples": 2}, 500: {"accuracy": 1.0, "samples": 2}}
    assert sum(v["samples"] for v in s["oracle"]["by_depth"].values()) == 4
    assert len(res["records"]) == 8


def test_summarize_by_depth_bins():
    recs = [{"task": "needle", "method": "m", "length": 10, "depth": d, "correct": c}
            for d, c in [(0.05, True), (0.1, False), (0.5, True), (0.99, True)]]
    s = summarize(recs)["needle"]["m"]
    assert s["accuracy"] == 0.75
    assert s["by_depth"] == {"0.0-0.2": {"accuracy": 0.5, "samples": 2}, "0.4-0.6": {"accuracy": 1.0, "samples": 1},
                             "0.8-1.0": {"accuracy": 1.0, "samples": 1}}
