"""Incremental decoding: conditions on memory as forward does, KV-cached equals uncached, unbounded length."""

import pytest
import torch

from hiermem.inference.generate import GenerationConfig, generate
from hiermem.models.hmt import HMTDecoder
from tiny import assert_states_close, random_ids, tiny_hmt


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
    """feed() folds whole segments with one forward pass; small pieces go through the KV cache:
    both leave the same memory and next-token logits."""
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


@pytest.mark.parametrize("source", ["previous", "segment"])
@pytest.mark.parametrize("stage,eviction", [(2, "fifo"), (2, "attention"), (1, "fifo")])
def test_decoder_conditions_on_memory_as_forward_does(source, stage, eviction):
    """After every feed, in pieces of 1..9 tokens across folds and evictions, the decoder's logits
    are forward()'s for the last of the same tokens read in one call, and its state is forward()'s.
    With the causal summary they are also the logits of one call over the whole document."""
    model = tiny_hmt("llama", dtype=torch.float64, stage=stage, eviction=eviction, cache_size=3,
                     summary_source=source)
    ids = random_ids(2, 6 * 16 + 11, seed=9)
    dec = HMTDecoder(model, batch_size=2)
    with torch.no_grad():
        whole = model(ids)
    t, sizes = 0, [1, 3, 9, 1, 1, 7, 4, 9, 2, 5, 1, 8]
    while t < ids.shape[1]:
        n = min(sizes[t % len(sizes)], ids.shape[1] - t)
        logits = dec.feed(ids[:, t:t + n])
        t += n
        with torch.no_grad():
            ref = model(ids[:, :t], return_logits=False)
        torch.testing.assert_close(logits, ref.last_logits.float(), rtol=1e-6, atol=1e-6)
        if source == "previous":
            torch.testing.assert_close(logits, whole.logits[:, t - 1].float(), rtol=1e-6, atol=1e-6)
        assert_states_close(dec.state, ref.state, tol=1e-8)
    torch.testing.assert_close(dec.state.bank.embeddings, whole.state.bank.embeddings)
    assert torch.equal(dec.state.pending, whole.state.pending) and dec.state.tokens == ids.shape[1]


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
