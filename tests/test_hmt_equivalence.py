"""HMT against the bare backbone, and whole-input against chunked calls with carried memory."""

import pytest
import torch

from hmt_reference import reference_hmt
from tiny import assert_states_close, random_ids, tiny_hmt

KINDS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2", "opt"]


@pytest.mark.parametrize("kind", KINDS)
def test_memory_off_equals_backbone(kind):
    """Memory off, no sensory tokens: each segment's logits are the backbone's on that chunk."""
    model = tiny_hmt(kind, use_memory=False, sensory_length=0, segment_bos=False)
    ids = random_ids(2, 40)
    with torch.no_grad():
        out = model(ids).logits
        for s in range(0, 40, 16):
            ref = model.backbone(ids[:, s:s + 16]).logits
            torch.testing.assert_close(out[:, s:s + 16], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_memory_off_single_segment_with_bos(kind):
    """segment_bos: the wrapper's logits equal the backbone's on [BOS] + tokens."""
    model = tiny_hmt(kind, use_memory=False, sensory_length=0, segment_bos=True)
    ids = random_ids(1, 12)
    with torch.no_grad():
        out = model(ids).logits
        ref = model.backbone(torch.cat([torch.ones(1, 1, dtype=torch.long), ids], 1)).logits[:, 1:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_default_puts_bos_before_the_memory_prompt():
    """Unset segment_bos: with memory, every call reads [BOS, P, tokens, ...] (P off the attention
    sink at position 0); without memory the backbone's input is left alone."""
    model = tiny_hmt("llama")
    assert model.config.segment_bos and not tiny_hmt("llama", use_memory=False).config.segment_bos
    ids = random_ids(1, 12)
    with torch.no_grad():
        out = model(ids).logits
        bos = model.embed(torch.full((1, 1), model.bos_token_id))
        ref = model.backbone(inputs_embeds=torch.cat([bos, model.initial_memory, model.embed(ids)], 1)).logits
    torch.testing.assert_close(out, ref[:, 2:], rtol=1e-5, atol=1e-5)


def test_memory_changes_outputs():
    """With memory on, segments after the first see the past: logits differ from memory-off."""
    on = tiny_hmt("llama")
    off = tiny_hmt("llama", use_memory=False, segment_bos=True)
    ids = random_ids(1, 48)
    with torch.no_grad():
        a, b = on(ids).logits, off(ids).logits
    assert (a[:, 16:] - b[:, 16:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("stage,eviction", [(1, "fifo"), (2, "fifo"), (2, "attention")])
def test_whole_equals_chunked(kind, stage, eviction):
    """One call over 7 segments == 3 calls with the carried state (float64), logits and memory."""
    model = tiny_hmt(kind, dtype=torch.float64, stage=stage, eviction=eviction, cache_size=3, summary_batch=3)
    ids = random_ids(2, 7 * 16 + 5)
    with torch.no_grad():
        whole = model(ids, labels=ids, return_token_nll=True)
        mem, parts = None, []
        for s, e in [(0, 32), (32, 80), (80, ids.shape[1])]:
            out = model(ids[:, s:e], state=mem, return_token_nll=True)
            mem = out.state
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mem.bank.embeddings, whole.state.bank.embeddings, rtol=1e-10, atol=1e-10)
    assert torch.equal(mem.bank.sources, whole.state.bank.sources)
    torch.testing.assert_close(mem.bank.usage, whole.state.bank.usage)
    assert torch.equal(mem.sensory, whole.state.sensory)
    assert (mem.segments, mem.tokens, mem.pending_length) == (7, ids.shape[1], 5)  # the last 5 tokens wait
    assert torch.equal(mem.pending, whole.state.pending) and torch.equal(mem.pending, ids[:, -5:])
    assert whole.state.bank.size == 3


@pytest.mark.parametrize("stage,eviction", [(1, "fifo"), (2, "fifo"), (2, "attention")])
def test_any_split_equals_one_call(stage, eviction):
    """Calls of arbitrary lengths (mid-segment boundaries included) == one call: logits, loss
    terms and the whole state, with the causal summary."""
    model = tiny_hmt("llama", dtype=torch.float64, stage=stage, eviction=eviction, cache_size=3,
                     summary_batch=2, summary_source="previous")
    ids = random_ids(2, 9 * 16 + 7, seed=4)
    with torch.no_grad():
        whole = model(ids, return_token_nll=True)
        for cuts in ([5, 21, 22, 50, 97, 140], [1, 2, 3, 17, 33, 34, 100], [15, 31, 47, 63, 79]):
            state, parts = None, []
            for s, e in zip([0, *cuts], [*cuts, ids.shape[1]]):
                out = model(ids[:, s:e], state=state)
                state = out.state
                parts.append(out.logits)
            torch.testing.assert_close(torch.cat(parts, 1), whole.logits, rtol=1e-10, atol=1e-10)
            assert_states_close(state, whole.state)
            assert (state.segments, state.tokens, state.pending_length) == (9, ids.shape[1], 7)


def test_paper_summary_splits_equal_except_the_leaked_prefix():
    """With the paper's summary (the segment's own first j tokens) a call that stops inside a
    segment's first j tokens conditions them on a shorter summary; from token j on, and for the
    state, any split still equals one call."""
    model = tiny_hmt("llama", dtype=torch.float64, cache_size=3, summary_source="segment")  # j = 8
    ids = random_ids(1, 6 * 16, seed=5)
    with torch.no_grad():
        whole = model(ids)
        a = model(ids[:, :68])  # stops 4 tokens into segment 4 (its summary would read 8)
        b = model(ids[:, 68:], state=a.state)
    logits = torch.cat([a.logits, b.logits], 1)
    torch.testing.assert_close(logits[:, :64], whole.logits[:, :64], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(logits[:, 64:68], whole.logits[:, 64:68])  # what the full summary leaked
    torch.testing.assert_close(logits[:, 68:], whole.logits[:, 68:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.state.bank.embeddings, whole.state.bank.embeddings, rtol=1e-10, atol=1e-10)


def test_loss_matches_direct_computation():
    """loss == mean token NLL recomputed from the logits; every token but the first scored once."""
    model = tiny_hmt("llama")
    ids = random_ids(2, 50)
    with torch.no_grad():
        out = model(ids, labels=ids, return_token_nll=True)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                            ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert out.num_tokens == 2 * 49 and out.token_nll.shape == (2, 49)


def test_loss_skip_segments_and_ignore_index():
    model = tiny_hmt("llama")
    ids = random_ids(1, 48)
    labels = ids.clone()
    labels[:, 20:24] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, loss_skip_segments=1)
    # segment 0 covers targets 1..16 (skipped); segments 1-2 score targets 17..47 minus 4 ignored
    assert out.num_tokens == 31 - 4


def test_memory_stays_flat_without_logits():
    """Reading 30 segments without logits keeps no per-segment tensors: bank is capped at N."""
    model = tiny_hmt("llama", cache_size=4)
    with torch.no_grad():
        out = model(random_ids(1, 30 * 16), return_logits=False)
    assert out.logits is None and out.state.bank.size == 4
    assert out.state.bank.sources.tolist() == [[26, 27, 28, 29]]


@pytest.mark.parametrize("source", ["segment", "previous"])
@pytest.mark.parametrize("stage,eviction", [(1, "fifo"), (2, "fifo"), (2, "attention")])
def test_equals_naive_reference(stage, eviction, source):
    """Segments 0..5 with memory on (the bank fills and evicts at N=3) == the paper's formulas
    written as a plain loop in tests/hmt_reference.py, float64."""
    model = tiny_hmt("llama", dtype=torch.float64, stage=stage, eviction=eviction, cache_size=3,
                     summary_source=source, summary_batch=4)
    ids = random_ids(2, 6 * 16, seed=7)
    with torch.no_grad():
        out = model(ids)
        ref_logits, ref_bank = reference_hmt(model, ids)
    assert model.config.segment_bos  # BOS before P (the default with memory on)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.state.bank.embeddings, ref_bank, rtol=1e-9, atol=1e-9)
    # memory mattered: segments >= 1 differ from the bare backbone read chunk by chunk
    assert not torch.allclose(out.logits[:, 16:32], model.backbone(ids[:, 16:32]).logits, atol=1e-3)
