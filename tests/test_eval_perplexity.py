"""Perplexity arithmetic: every token scored once, and each method equal to a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from hiermem.errors import CheckpointError, ConfigError, DataError
from hiermem.evaluation import (NLLTally, TokenDocument, evaluate_perplexity, load_eval_models, model_nll,
                                plan_windows, window_nll)
from tiny import random_ids, tiny_backbone, tiny_hmt, tiny_model_folder, tiny_tokenizer


def direct_nll(model, ids, window, bos=None):
    """Reference: token t predicted by one backbone call on the (at most) `window` tokens before it."""
    out = []
    for t in range(1, ids.shape[0]):
        ctx = ids[max(0, t - window):t]
        if bos is not None:
            ctx = torch.cat([torch.tensor([bos]), ctx])
        logits = model(ctx[None]).logits[0, -1]
        out.append(F.cross_entropy(logits[None], ids[t:t + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("T,W,s", [(2, 4, 1), (10, 4, 4), (37, 8, 3), (50, 16, 16), (33, 7, 1)])
def test_windows_score_every_token_once(T, W, s):
    seen = []
    for w in plan_windows(T, W, s):
        assert 0 <= w.start <= w.score_from < w.end <= T - 1
        assert w.end - w.start <= W
        if w.score_from:  # after the first window, each scored position sees >= W - s + 1 tokens
            assert w.score_from - w.start + 1 >= W - s + 1
        seen += range(w.score_from, w.end)
    assert seen == list(range(T - 1))


def test_plan_windows_rejects_bad_stride():
    with pytest.raises(ConfigError, match="stride"):
        plan_windows(10, 4, 5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_sliding_stride_one_equals_per_token_loop(kind):
    model = tiny_backbone(kind, dtype=torch.float64)
    ids = random_ids(1, 23)[0]
    with torch.no_grad():
        ref = direct_nll(model, ids, window=7)
        got = window_nll(model, ids, window=7, stride=1, batch_size=4)
        got_bos = window_nll(model, ids, window=7, stride=1, bos_token_id=1, batch_size=3)
        ref_bos = direct_nll(model, ids, window=7, bos=1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_bos, ref_bos, rtol=0, atol=1e-10)


def test_chunks_equal_hf_loss_per_chunk():
    """chunks: inside each chunk the HF loss on that chunk; its first token from the previous chunk's end."""
    model = tiny_backbone("llama", dtype=torch.float64)
    ids, L = random_ids(1, 53)[0], 16
    with torch.no_grad():
        nll = window_nll(model, ids, window=L, stride=L)
        assert nll.shape == (52,)
        for s in range(0, 53, L):
            chunk = ids[s:s + L]
            if chunk.shape[0] > 1:
                hf = model(chunk[None], labels=chunk[None]).loss  # HF computes its loss in float32
                torch.testing.assert_close(nll[s:s + chunk.shape[0] - 1].mean().float(), hf, rtol=1e-6, atol=1e-6)
            if s:  # token s is predicted by the last position of the previous chunk
                prev = model(ids[s - L:s][None]).logits[0, -1]
                torch.testing.assert_close(nll[s - 1], F.cross_entropy(prev[None], ids[s:s + 1]), rtol=0, atol=1e-10)


def test_full_context_in_cached_blocks_equals_one_pass():
    model = tiny_backbone("qwen2", dtype=torch.float64)
    ids = random_ids(1, 90)[0]
    with torch.no_grad():
        one_pass = F.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:], reduction="none")
        blocks = window_nll(model, ids, window=200, stride=200, block=16)
    torch.testing.assert_close(blocks, one_pass, rtol=0, atol=1e-10)


def test_model_nll_matches_forward_loss():
    model = tiny_hmt("llama", dtype=torch.float64)
    ids = random_ids(1, 70)[0]
    with torch.no_grad():
        nll, _ = model_nll(model, ids)
        out = model(ids[None], labels=ids[None])
    assert nll.shape == (69,) and out.num_tokens == 69
    torch.testing.assert_close(nll.mean(), out.loss, rtol=0, atol=1e-10)


def test_tally_counts_and_token_weighted_perplexity():
    tally = NLLTally(segment_length=4)
    a, b = torch.rand(10), torch.rand(5)  # documents of 11 and 6 tokens
    tally.add(a)
    tally.add(b)
    # tokens 1..10 -> segments 0,0,0,1,1,1,1,2,2,2 ; tokens 1..5 -> 0,0,0,1,1
    assert tally.counts == [6, 6, 3]
    assert tally.tokens == 15
    assert tally.summary()["ppl"] == pytest.approx(math.exp(float(torch.cat([a, b]).double().mean())))
    seg1 = torch.cat([a[3:7], b[3:5]]).double().mean()
    assert tally.by_segment()[1]["ppl"] == pytest.approx(math.exp(float(seg1)))
    assert tally.by_segment()[1]["tokens"] == 6


def test_comparison_scores_same_tokens_and_memory_off_equals_chunks():
    """HMT with memory and sensory tokens off is the backbone on independent segments: == chunks."""
    off = tiny_hmt("llama", dtype=torch.float64, use_memory=False, sensory_length=0)
    docs = [TokenDocument("a", random_ids(1, 75, seed=2)[0]), TokenDocument("b", random_ids(1, 40, seed=3)[0])]
    res = evaluate_perplexity({"hmt-fifo": off}, off.backbone, docs, ["chunks", "sliding", "full", "hmt-fifo"],
                              stride=4)
    for t in res.tallies.values():
        assert t.tokens == 74 + 39
        assert t.counts == res.tallies["chunks"].counts
    for j in range(len(res.tallies["chunks"].sums)):
        # HMT scores in float32: agreement to float32 rounding
        assert res.tallies["hmt-fifo"].sums[j] == pytest.approx(res.tallies["chunks"].sums[j], rel=1e-7)
    assert res.settings["window"] == 16 and res.settings["stride"] == 4
    d = res.to_dict()
    assert set(d["methods"]) == {"chunks", "sliding", "full", "hmt-fifo"}
    assert [r["id"] for r in d["documents"]] == ["a", "b"]


def test_chunks_with_bos_equal_memory_off_hmt_with_segment_bos():
    """baseline BOS: chunks read [BOS, chunk], as HMT does with segment_bos and memory off."""
    off = tiny_hmt("llama", dtype=torch.float64, use_memory=False, sensory_length=0, segment_bos=True)
    docs = [TokenDocument("a", random_ids(1, 75, seed=2)[0])]
    res = evaluate_perplexity({"hmt-fifo": off}, off.backbone, docs, ["chunks", "hmt-fifo"],
                              bos_token_id=off.bos_token_id)
    plain = evaluate_perplexity({}, off.backbone, docs, ["chunks"], segment_length=16)
    assert res.settings["baseline_bos"] and not plain.settings["baseline_bos"]
    assert res.tallies["hmt-fifo"].sums == pytest.approx(res.tallies["chunks"].sums, rel=1e-7)
    assert res.tallies["chunks"].sums != pytest.approx(plain.tallies["chunks"].sums, rel=1e-3)


def test_baselines_alone_need_a_segment_length():
    model = tiny_backbone("gpt2")
    docs = [TokenDocument("a", random_ids(1, 30)[0])]
    res = evaluate_perplexity({}, model, docs, ["chunks", "sliding"], segment_length=8, stride=8)
    assert res.tallies["chunks"].sums == pytest.approx(res.tallies["sliding"].sums)  # stride = window: chunks
    assert res.tallies["chunks"].counts == [7, 8, 8, 6]
    with pytest.raises(ConfigError, match="segment_length"):
        evaluate_perplexity({}, model, docs, ["chunks"])


def test_bad_input_is_refused():
    model = tiny_hmt("llama")
    docs = [TokenDocument("long", random_ids(1, 40)[0])]
    with pytest.raises(ConfigError, match="unknown perplexity method"):
        evaluate_perplexity({"hmt-fifo": model}, model.backbone, docs, ["chunks", "transformer-xl"])
    with pytest.raises(DataError, match="longer than one segment.*'short' with 16 tokens"):
        evaluate_perplexity({"hmt-fifo": model}, model.backbone, docs + [TokenDocument("short", random_ids(1, 16)[0])],
                            ["chunks", "hmt-fifo"])


def test_checkpoint_for_another_backbone_is_refused(tmp_path):
    ckpt = tiny_model_folder(tmp_path)  # HMT over a tiny llama
    other = tmp_path / "qwen"
    tiny_backbone("qwen2").save_pretrained(other)
    tiny_tokenizer(chat_template=False).save_pretrained(other)
    with pytest.raises(CheckpointError, match="built for a backbone"):
        load_eval_models(str(ckpt), str(other), device="cpu")


def test_eval_models_of_an_hmt_checkpoint(tmp_path):
    """`model` is the checkpoint as saved; registry variants load with their overrides; one tokenizer."""
    ckpt = tiny_model_folder(tmp_path, chat_template=False)
    models = load_eval_models(str(ckpt), methods=["chunks", "model", "rmt", "hmt-fifo"], device="cpu")
    assert models.model_type == "hmt" and models.backbone is not None
    assert models.tokenizer is models.backbone.tokenizer is models.model.tokenizer
    assert models.variants["model"] is models.model and models.variants["hmt-fifo"] is models.model
    assert models.variants["rmt"].config.stage == 1 and models.model.config.stage == 2
    with pytest.raises(ConfigError, match="unknown perplexity method.*choose among chunks, sliding, full, model"):
        load_eval_models(str(ckpt), methods=["transformer-xl"], device="cpu")
    with pytest.raises(ConfigError, match="no option"):
        load_eval_models(str(ckpt), device="cpu", cache_sise=3)
