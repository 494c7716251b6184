"""Incremental decoding: KV-cached equals uncached, folding equals forward, unbounded length."""

import pytest
import torch

from hiermem.inference.generate import GenerationConfig, generate
from hiermem.models.hmt import HMTDecoder
from tiny import random_ids, tiny_hmt


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "gemma3"])
def test_cached_greedy_equals_uncached(kind):
    model = tiny_hmt(kind, dtype=torch.float64)
    prompt = random_ids(1, 37)
    cfg = GenerationConfig(max_new_tokens=40, do_sample=False)
    fast = generate(model, prompt, cfg, decoder=HMTDecoder(model, use_kv_cache=True))
    slow = generate(model, prompt, cfg, decoder=HMTDecoder(model, use_kv_cache=False))
    assert fast.tokens.shape == (1, 40)  # 37 + 40 tokens: crosses several segment folds
    assert torch.equal(fast.tokens, slow.tokens)


def test_fold_matches_forward():
    """Feeding whole segments through the decoder leaves the same memory as forward()."""
    model = tiny_hmt("llama", dtype=torch.float64, eviction="attention", cache_size=2)
    ids = random_ids(2, 64)
    dec = HMTDecoder(model, batch_size=2)
    logits = dec.feed(ids[:, :10])
    logits = dec.feed(ids[:, 10:])
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(dec.state.bank.embeddings, out.state.bank.embeddings)
    torch.testing.assert_close(logits, out.logits[:, -1].float())
    assert dec.tokens_seen == 64


def test_feeding_whole_segments_at_once_equals_piecewise():
    """feed() folds whole segments with one forward pass; small pieces go through the KV cache
    and _fold: both leave the same memory and next-token logits."""
    model = tiny_hmt("llama", dtype=torch.float64, eviction="attention", cache_size=3)
    L = model.config.segment_length
    ids = random_ids(2, 3 * L + 5)
    whole, pieces = HMTDecoder(model, batch_size=2), HMTDecoder(model, batch_size=2)
    logits = whole.feed(ids)
    for start in range(0, ids.shape[1], 7):
        piece_logits = pieces.feed(ids[:, start:start + 7])
    torch.testing.assert_close(whole.state.bank.embeddings, pieces.state.bank.embeddings)
    torch.testing.assert_close(whole.state.sensory, pieces.state.sensory)
    torch.testing.assert_close(logits, piece_logits)
    assert whole.tokens_seen == pieces.tokens_seen == 3 * L + 5


def test_generation_far_past_one_segment_is_flat():
    model = tiny_hmt("llama", cache_size=3)
    out = generate(model, random_ids(1, 5), GenerationConfig(max_new_tokens=200, do_sample=True, seed=3,
                                                                  eos_token_id=[]))  # no EOS: all 200
    assert out.tokens.shape == (1, 200)
    assert out.decoder.state.bank.size == 3 and out.decoder.state.segments == 12


def test_sampling_is_reproducible_with_seed():
    model = tiny_hmt("llama")
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a = generate(model, random_ids(1, 8), cfg).tokens
    b = generate(model, random_ids(1, 8), cfg).tokens
    assert torch.equal(a, b)
