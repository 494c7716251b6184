"""`hiermem quantize`: int8 backbones saved without pickle, reloaded exactly, usable by every command."""

import json

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from hiermem.cli import main
from hiermem.errors import CheckpointError
from hiermem.inference.quantize import is_quantized, load_quantized, quantize_backbone, save_quantized
from hiermem.inference.runtime import load_for_inference
from tiny import tiny_model_folder, tiny_tokenizer
from tiny import random_ids, tiny_hmt


@pytest.mark.parametrize("kind, head", [("llama", True), ("gemma3", True), ("opt", False)])
def test_quantized_model_reloads_exactly(tmp_path, kind, head):
    model = tiny_hmt(kind)
    ids = random_ids(1, 40)
    linears = [n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        ref = model(ids).logits
        names = quantize_backbone(model.backbone, include_head=head, keep_float=())
        quant = model(ids).logits
    assert names == (linears if head else [n for n in linears if n != "lm_head"])
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.backbone.named_modules() if n in names)
    err = (quant - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.1  # int8: changed, but close
    save_quantized(model, tiny_tokenizer(), tmp_path / "q", source="tiny")
    assert is_quantized(tmp_path / "q")
    assert not list((tmp_path / "q").rglob("*.bin")) and not list((tmp_path / "q").rglob("*.pt"))
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, quant)


def test_default_keeps_mlp_output_projections_in_float(tmp_path):
    folder = tiny_model_folder(tmp_path)
    assert main(["quantize", "--model", str(folder), str(tmp_path / "q")]) == 0
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert info["include_head"] is True and info["modules"] == 13  # 2 layers x 6 + head; 2 down_proj kept
    model, _ = load_for_inference(str(tmp_path / "q"))
    modules = dict(model.backbone.named_modules())
    assert type(modules["model.layers.0.mlp.down_proj"]) is torch.nn.Linear
    assert isinstance(modules["lm_head"], DynamicLinear) and isinstance(modules["model.layers.1.mlp.up_proj"],
                                                                        DynamicLinear)
    assert main(["quantize", "--model", str(folder), str(tmp_path / "all"), "--keep-float"]) == 0
    dense = sum(p.stat().st_size for p in (tmp_path / "backbone").glob("*.safetensors"))
    int8 = (tmp_path / "all" / "backbone" / "int8.safetensors").stat().st_size
    assert int8 < 0.6 * dense


def test_quantized_folder_works_with_generate_and_rejects_requantizing(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path)
    assert main(["quantize", "--model", str(folder), str(tmp_path / "q"), "--no-include-head"]) == 0
    model, tok = load_for_inference(str(tmp_path / "q"))
    assert type(model.backbone.get_output_embeddings()) is torch.nn.Linear  # head left in float
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["quantize", "--model", str(tmp_path / "q"), str(tmp_path / "q2")]) == 2


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_smoothing_is_exact_in_float_and_survives_reload(tmp_path, kind):
    from hiermem.inference.quantize import select_layers, smooth_activations

    model = tiny_hmt(kind, dtype=torch.float64)
    ids = random_ids(1, 40)
    with torch.no_grad():
        ref = model(ids).logits
    norm = model.backbone.model.layers[0].input_layernorm.weight.clone()
    groups = smooth_activations(model.backbone, random_ids(1, 64, seed=9), select_layers(model.backbone, keep_float=()))
    assert groups == 4  # 2 layers x (attention input, MLP input)
    assert not torch.equal(norm, model.backbone.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)
    model = tiny_hmt(kind).float()
    quantize_backbone(model.backbone, calibration=random_ids(1, 64, seed=9))
    save_quantized(model, tiny_tokenizer(), tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, model(ids).logits)


def test_corrupt_quantized_weights_raise(tmp_path):
    model = tiny_hmt("llama")
    quantize_backbone(model.backbone)
    save_quantized(model, tiny_tokenizer(), tmp_path / "q")
    (tmp_path / "q" / "backbone" / "int8.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "q")


@pytest.mark.slow
def test_smollm2_int8_perplexity_stays_close():
    from hiermem.data.corpora import shakespeare
    from hiermem.inference.runtime import encode

    torch.set_num_threads(2)
    model, tok = load_for_inference(None, device="cpu")
    text = shakespeare()[0].text[5000:7000]
    ids = encode(tok, text)[:, :200]
    from hiermem.inference.quantize import CALIBRATION_TEXT

    with torch.no_grad():
        dense = model(ids, labels=ids).loss.exp().item()
        quantize_backbone(model.backbone, calibration=encode(tok, CALIBRATION_TEXT))
        int8 = model(ids, labels=ids).loss.exp().item()
    assert 1 < int8 / dense < 1.2, (dense, int8)  # see benchmarks/bench_quantize.py for the trade-off
