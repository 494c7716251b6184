"""Gradients, truncated BPTT, persistence of weights and memory states, bad-input errors."""

import pytest
import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.models.hmt import HMT, HMTConfig, HMTMemory
from tiny import random_ids, tiny_backbone, tiny_hmt


def test_gradients_reach_memory_parameters_only():
    model = tiny_hmt("llama").train()
    ids = random_ids(2, 4 * 16)
    model(ids, labels=ids).loss.backward()
    for name in ["summary_prompt", "initial_memory", "recall.query.weight", "recall.key.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())


def _grad_on_initial_bank(bptt_depth, loss_segment):
    """Gradient of one segment's loss w.r.t. a bank slot handed in with the initial state."""
    model = tiny_hmt("llama", bptt_depth=bptt_depth, stage=2, cache_size=8)
    mem = model.init_state(1)
    slot = torch.randn(1, 1, 32, requires_grad=True)
    mem = HMTMemory(mem.bank.__class__(slot, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)),
                    None, mem.sensory)
    ids = random_ids(1, 6 * 16)
    labels = torch.full_like(ids, -100)
    labels[:, loss_segment * 16 + 1:(loss_segment + 1) * 16] = ids[:, loss_segment * 16 + 1:(loss_segment + 1) * 16]
    model(ids, state=mem, labels=labels).loss.backward()
    return slot.grad


@pytest.mark.parametrize("depth", [2, 3])
def test_bptt_depth_truncates(depth):
    inside = _grad_on_initial_bank(depth, depth - 1)
    beyond = _grad_on_initial_bank(depth, depth)
    assert inside is not None and inside.abs().sum() > 0
    assert beyond is None or beyond.abs().sum() == 0


def test_unlimited_bptt_reaches_far():
    g = _grad_on_initial_bank(None, 5)
    assert g is not None and g.abs().sum() > 0


def test_save_and_from_pretrained_roundtrip(tmp_path):
    model = tiny_hmt("qwen2", memory_projection="linear")
    with torch.no_grad():
        for p in model.memory_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "memory.safetensors"]
    again = HMT.from_pretrained(tmp_path, backbone=model.backbone)
    ids = random_ids(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert again.config == model.config


def test_from_pretrained_refuses_other_backbone(tmp_path):
    tiny_hmt("llama").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="built for a backbone"):
        HMT.from_pretrained(tmp_path, backbone=tiny_backbone("gpt2"))


def test_corrupt_weights_file(tmp_path):
    tiny_hmt("llama").save_pretrained(tmp_path)
    path = tmp_path / "memory.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        HMT.from_pretrained(tmp_path, backbone=tiny_backbone("llama"))
    with pytest.raises(CheckpointError, match="config.json"):
        HMT.from_pretrained(tmp_path / "nowhere", backbone=tiny_backbone("llama"))


def test_memory_state_roundtrip(tmp_path):
    model = tiny_hmt("llama", eviction="attention", cache_size=3)
    ids = random_ids(2, 5 * 16)
    with torch.no_grad():
        first = model(ids[:, :48])
        first.state.save(tmp_path / "m.safetensors", fingerprint=model.config.backbone_fingerprint)
        loaded = HMTMemory.load(tmp_path / "m.safetensors", fingerprint=model.config.backbone_fingerprint)
        a = model(ids[:, 48:], state=first.state).logits
        b = model(ids[:, 48:], state=loaded).logits
    assert torch.equal(a, b)
    assert loaded.segments == 3 and loaded.tokens == 48
    with pytest.raises(CheckpointError, match="different model"):
        HMTMemory.load(tmp_path / "m.safetensors", fingerprint={"model_type": "gpt2"})


@pytest.mark.parametrize("bad", [dict(segment_length=0), dict(sensory_length=40, segment_length=16),
                                 dict(stage=3), dict(eviction="lru"), dict(eviction_decay=1.5),
                                 dict(memory_projection="mlp"), dict(summary_length=17, segment_length=16)])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ConfigError):
        HMTConfig(**bad)


def test_segment_too_long_for_backbone():
    with pytest.raises(ConfigError, match="positions"):
        HMT(tiny_backbone("gpt2"), HMTConfig(segment_length=600, sensory_length=0))


def test_config_json_tolerates_old_and_new_fields():
    cfg = HMTConfig.from_dict({"segment_length": 32, "field_from_the_future": 1})
    assert cfg.segment_length == 32 and cfg.cache_size == 300
