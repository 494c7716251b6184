"""HMT on the real bundled SmolLM2-135M (short inputs so that CI stays fast)."""

import pytest
import torch

from hiermem.backbones import load_backbone
from hiermem.inference.generate import GenerationConfig, generate
from hiermem.models.hmt import HMT, HMTConfig, HMTDecoder

pytestmark = pytest.mark.slow

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
        "that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with "
        "victorious wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry "
        "meetings, our dreadful marches to delightful measures.")


@pytest.fixture(scope="module")
def smol():
    return load_backbone("smollm2-135m", device="cpu")


def test_memory_off_equals_backbone(smol):
    model = HMT(smol.model, HMTConfig(segment_length=128, sensory_length=0, use_memory=False))
    ids = smol.tokenizer(TEXT, return_tensors="pt").input_ids[:, :100]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, smol.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_chunked_equals_whole_and_generation(smol):
    model = HMT(smol.model, HMTConfig(segment_length=32, sensory_length=8, cache_size=4, eviction="attention"))
    ids = smol.tokenizer(TEXT, return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        whole = model(ids, labels=ids)
        first = model(ids[:, :64])
        second = model(ids[:, 64:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-3, atol=1e-3)
    # against the bare backbone on the same tokens (every one but the first), which sees all of the
    # past: HMT sees at most a segment plus memory, so it may not beat it (a future-token leak would)
    # and, with untrained memory, should stay close (a broken memory prompt would not)
    with torch.no_grad():
        backbone = smol.model(ids, labels=ids).loss
    assert whole.num_tokens == ids.shape[1] - 1
    assert backbone - 0.05 < whole.loss < backbone + 0.5, (float(whole.loss), float(backbone))
    cfg = GenerationConfig(max_new_tokens=40, do_sample=False)
    fast = generate(model, ids[:, :40], cfg, decoder=HMTDecoder(model))
    slow = generate(model, ids[:, :40], cfg, decoder=HMTDecoder(model, use_kv_cache=False))
    assert torch.equal(fast.tokens, slow.tokens)
    assert fast.decoder.state.segments == 2  # 80 tokens read: two folds of 32
    assert isinstance(smol.tokenizer.decode(fast.tokens[0]), str)


def test_mixed_corpus_release_loads_and_decodes_as_it_reads(smol):
    """The carried-regime release: LoRA adapters and the causal summary load with the backbone; the
    decoder fed token by token gives the logits of one forward call (a fresh backbone: adapters are
    injected into it)."""
    from hiermem.models import released_weights

    folder = released_weights("hmt-smollm2-135m-mix")
    assert folder is not None
    model = HMT.from_pretrained(folder, backbone=load_backbone("smollm2-135m", device="cpu"),
                                segment_length=32, sensory_length=8, cache_size=4).eval()
    assert model.config.summary_source == "previous" and model.config.lora["r"] == 8
    assert any("lora_" in n for n, _ in model.named_parameters())
    ids = smol.tokenizer(TEXT, return_tensors="pt").input_ids
    n = ids.shape[1]  # about 75 tokens: 2 whole segments of 32 and a partial one
    with torch.no_grad():
        whole = model(ids)
    dec = HMTDecoder(model)
    dec.feed(ids[:, :n - 20])
    for t in range(n - 20, n):
        logits = dec.feed(ids[:, t:t + 1])
        torch.testing.assert_close(logits, whole.logits[:, t].float(), rtol=1e-3, atol=1e-3)
    assert dec.state.segments == n // 32 and dec.state.pending_length == n % 32
