"""Weight-only quantization (q8_0, q4_0, int4, q2_k) of the from-scratch families: packing, error bounds,
save/load through load_model, generation, file sizes, clear errors."""

import json

import pytest
import torch

from hiermem.cli import main
from hiermem.errors import CheckpointError, ConfigError
from hiermem.evaluation.readers import model_greedy
from hiermem.inference.quantize import quantize
from hiermem.inference.quantize_weights import (FORMATS, GROUP, SUB, SUPER, QuantizedWeight, dequantize_tensor,
                                                quantize_model, quantize_tensor, select_weights, set_dequant_mode)
from hiermem.models import load_model
from scratch_family import save_with_byte_tokenizer

# max |logit change| / max |float logit| of the tiny random models below (every matrix quantized,
# heads included), measured 0.006-0.015 (q8_0) and 0.07-0.26 (q4_0, int4: a step 18x q8_0's)
TOLERANCE = {"q8_0": 0.03, "q4_0": 0.4, "int4": 0.4}
GROUPED = [f for f in FORMATS if f != "q2_k"]  # q2_k has its own blocks (256 / 16) and tests


def _roundtrip(w, fmt):
    d = quantize_tensor(w, fmt)
    return dequantize_tensor(d["packed"], d["scales"], fmt, w.shape[-1], d.get("mins"), sup=d.get("super")), d


@pytest.mark.parametrize("fmt, levels", [("q4_0", range(-7, 8)), ("q8_0", range(-127, 128)), ("int4", range(16))])
def test_representable_values_are_recovered_exactly(fmt, levels):
    g = torch.Generator().manual_seed(0)
    lv = torch.tensor(list(levels), dtype=torch.float32)
    k = lv[torch.randint(len(lv), (6, 4, GROUP), generator=g)]
    k[..., 0], k[..., 1] = lv[0], lv[-1]  # every group spans the whole range, so its step is exactly 2^-6
    base = torch.tensor([0.0, 0.5, -1.0, 0.25])[:, None] if fmt == "int4" else 0.0  # int4: a per-group offset
    w = (k * 2.0 ** -6 + base).reshape(6, 4 * GROUP)
    back, d = _roundtrip(w, fmt)
    assert torch.equal(back, w)
    assert d["packed"].shape[-1] == 4 * GROUP // (2 if fmt != "q8_0" else 1)  # two 4-bit values per byte


@pytest.mark.parametrize("fmt", GROUPED)
@pytest.mark.parametrize("shape", [(17, 96), (3, 5, 70), (4, 7)])  # 70, 7: the last group is padded
def test_error_is_at_most_half_a_step_per_group(fmt, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.1
    w.view(-1)[3] = 2.5  # an outlier widens one group's step only
    back, d = _roundtrip(w, fmt)
    assert back.shape == w.shape
    step = d["scales"].float().repeat_interleave(GROUP, -1)[..., :shape[-1]]
    assert bool(((back - w).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all())
    assert bool((d["scales"] > 0).all())
    zeros, _ = _roundtrip(torch.zeros(2, 40), fmt)  # an all-zero group stays zero
    assert torch.equal(zeros, torch.zeros(2, 40))


def _transformer(vocab):
    from hiermem.models.transformer import Transformer, TransformerConfig

    return Transformer(TransformerConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=2,
                                         context_length=32, tie_embeddings=False))


def _hrmlm(vocab):
    from hiermem.models.hrmlm import HRMLM, HRMLMConfig

    return HRMLM(HRMLMConfig(vocab_size=vocab, n_embd=32, n_hidden=32, n_high_hidden=32, layer_norm=False))


def _hierarchos(vocab):
    from hiermem.models.hierarchos import Hierarchos, HierarchosConfig

    return Hierarchos(HierarchosConfig(vocab_size=vocab, context_dim=32, persistent_dim=4, ltm_slots=10,
                                       ltm_key_dim=6, ltm_val_dim=5, ltm_topk=3, h_hidden=32, l_hidden=32,
                                       h_stride=3, max_h_steps=3, max_l_steps=2))


def _hmst(vocab):
    from hiermem.models.hmst import HMST, HMSTConfig

    return HMST(HMSTConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                           attention_window=5, num_experts=4, top_k=2, intermediate_size=32, ssm_every=1,
                           ssm_state_size=4, ssm_expand=2, ssm_head_dim=16, ssm_chunk=4))


FAMILIES = {"transformer": _transformer, "hrmlm": _hrmlm, "hierarchos": _hierarchos, "hmst": _hmst}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (float model, its folder)."""
    out = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(name)
        model, _ = save_with_byte_tokenizer(make, root)
        out[name] = (model.eval(), root / "m")
    return out


@pytest.mark.parametrize("shape", [(9, 512), (2, 3, 300)])  # 300: the last super-block is padded
def test_q2k_error_is_within_a_half_step_and_the_minimum_code(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.1
    w.view(-1)[3] = 2.5  # an outlier widens one sub-block's step only
    back, d = _roundtrip(w, "q2_k")
    assert back.shape == w.shape and d["packed"].dtype == torch.uint8
    S = -(-shape[-1] // SUPER)
    assert d["packed"].shape[-1] == S * SUPER // 4 and d["scales"].shape[-1] == S * SUPER // SUB
    sup = d["super"].float()
    sc, m = (d["scales"] & 15).float(), (d["scales"] >> 4).float()
    step = (sup[..., 0].repeat_interleave(SUPER // SUB, -1) * sc).repeat_interleave(SUB, -1)[..., :shape[-1]]
    slack = (0.5 * sup[..., 1]).repeat_interleave(SUPER, -1)[..., :shape[-1]]  # rounding the minimum to its code
    assert bool(((back - w).abs() <= 0.5 * step + slack + 1e-6).all())
    bits = 8 * sum(d[k].numel() * d[k].element_size() for k in d) / w.numel()
    assert bits <= 2.625 * (S * SUPER / shape[-1]) + 1e-9  # 2 bits + 4-bit codes per 16 + two fp16 per 256
    zeros, _ = _roundtrip(torch.zeros(2, 256), "q2_k")
    assert torch.equal(zeros, torch.zeros(2, 256))


def test_q2k_quantizes_the_wide_matrices_of_a_model_loads_and_generates(tmp_path):
    from hiermem.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    make = lambda v: Transformer(TransformerConfig(vocab_size=v, hidden_size=256, num_layers=1, num_heads=4,  # noqa: E731
                                                   context_length=32, tie_embeddings=False))
    model, _ = save_with_byte_tokenizer(make, tmp_path)
    model.eval()
    assert main(["quantize", "--model", str(tmp_path / "m"), str(tmp_path / "q2"), "--format", "q2_k"]) == 0
    assert main(["quantize", "--model", str(tmp_path / "m"), str(tmp_path / "q4"), "--format", "q4_0"]) == 0
    q = load_model(tmp_path / "q2")
    holders = [m for m in q.modules() if isinstance(m, QuantizedWeight)]
    assert holders and all(h.fmt == "q2_k" and h.shape[-1] >= SUPER for h in holders)
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        ref, got, four = model(ids).logits, q(ids).logits, load_model(tmp_path / "q4")(ids).logits
    err2, err4 = (float((x - ref).abs().max() / ref.abs().max()) for x in (got, four))
    assert 0 < err4 < err2 < 1.5, (err4, err2)  # 2 bits cost more than 4, and the model still computes
    size = lambda f: (tmp_path / f / "quantized.safetensors").stat().st_size  # noqa: E731
    assert size("q2") < size("q4")
    out = model_greedy(q, ids[0, :6], 5)
    assert len(out) == 5


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt", GROUPED)
def test_each_family_quantizes_saves_loads_and_generates(saved, tmp_path, family, fmt):
    model, folder = saved[family]
    assert main(["quantize", "--model", str(folder), str(tmp_path / "q"), "--format", fmt, "--include-head"]) == 0
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert info["format"] == fmt and info["include_head"] is True and info["weights"]
    q = load_model(tmp_path / "q")
    holders = [m for m in q.modules() if isinstance(m, QuantizedWeight)]
    assert holders and all(h.fmt == fmt for h in holders)
    assert q.tokenizer is not None and len(q.tokenizer) == len(model.tokenizer)
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    err = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < err < TOLERANCE[fmt], err
    # the same model quantized in memory computes exactly what the reloaded one does
    torch.manual_seed(0)
    again = type(model).from_pretrained(folder).eval()
    quantize_model(again, fmt, include_head=True)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
    out = model_greedy(q, ids[0, :6], 5)
    assert len(out) == 5 and all(0 <= t < len(q.tokenizer) for t in out)
    for mode in ("read", "resident", "forward"):  # when weights are dequantized changes nothing computed
        set_dequant_mode(q, mode)
        with torch.no_grad():
            assert torch.equal(q(ids).logits, got)
    assert all(h.dequantized is None for h in holders)  # "forward": freed after the call


def test_heads_are_told_apart_from_the_body(saved):
    model, _ = saved["hrmlm"]
    body = select_weights(model)
    assert set(body) == {"low.weight_ih", "low.weight_hh", "high.weight_ih", "high.weight_hh"}
    assert set(select_weights(model, include_head=True)) == set(body) | {"embedding.weight", "head"}
    tied = saved["hierarchos"][0]  # tok_emb is tied to the output: a head; LTM keys/values and mixes stay float
    names = select_weights(tied)
    assert "tok_emb.weight" not in names and not any("ltm" in n or "mix" in n for n in names)
    assert "manager.key.weight" in names and "tok_emb.weight" in select_weights(tied, include_head=True)


def test_files_shrink_as_the_format_says(saved, tmp_path):
    _, folder = saved["hrmlm"]  # every matrix has a multiple of 32 inputs: no padding
    fp32 = (folder / "model.safetensors").stat().st_size
    sizes = {}
    for fmt in GROUPED:
        assert quantize(str(tmp_path / fmt), str(folder), format=fmt, include_head=True) == 0
        sizes[fmt] = (tmp_path / fmt / "quantized.safetensors").stat().st_size
    # bytes per weight: 4 (fp32) -> 1 + 2/32 (q8_0), 0.5 + 2/32 (q4_0), 0.5 + 4/32 (int4), ratios 0.27,
    # 0.14, 0.16; the fp32 biases and the file's header add ~3 KB to this 130 KB model
    assert sizes["q8_0"] < 0.29 * fp32 and sizes["q4_0"] < 0.18 * fp32 and sizes["int4"] < 0.20 * fp32
    assert sizes["q4_0"] < sizes["int4"] < sizes["q8_0"]
    assert quantize(str(tmp_path / "body"), str(folder), format="q4_0", include_head=False) == 0
    assert sizes["q4_0"] < (tmp_path / "body" / "quantized.safetensors").stat().st_size < fp32


def test_bad_inputs_give_clear_errors(saved, tmp_path, capsys):
    _, folder = saved["transformer"]
    with pytest.raises(ConfigError, match="from-scratch model quantizes to q8_0, q4_0, int4, q2_k"):
        quantize(str(tmp_path / "a"), str(folder), format="int8")
    with pytest.raises(ConfigError, match="unknown weight format 'q3_k'"):
        quantize_tensor(torch.zeros(2, 32), "q3_k")
    with pytest.raises(SystemExit):  # the command line lists the choices
        main(["quantize", "--model", str(folder), str(tmp_path / "b"), "--format", "q3_k"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="q2_k quantizes weights of >= 256 inputs"):  # this model is 64 wide
        quantize(str(tmp_path / "narrow"), str(folder), format="q2_k")
    (tmp_path / "empty").mkdir()
    assert main(["quantize", "--model", str(tmp_path / "empty"), str(tmp_path / "c"), "--format", "q4_0"]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert quantize(str(tmp_path / "q"), str(folder), format="q4_0") == 0
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(str(tmp_path / "again"), str(tmp_path / "q"), format="q8_0")
    with pytest.raises(ConfigError, match="--keep-float applies to HMT"):
        quantize(str(tmp_path / "d"), str(folder), format="q8_0", keep_float=["lm_head"])
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    (tmp_path / "q" / "quantization.json").write_text(json.dumps({**record, "weights": ["nope.weight"]}))
    with pytest.raises(CheckpointError, match="no weight 'nope.weight'"):
        load_model(tmp_path / "q")
    with pytest.raises(ConfigError, match="mode must be one of"):
        set_dequant_mode(saved["hrmlm"][0], "lazy")


def test_hmt_rejects_weight_only_formats(tmp_path):
    from tiny import tiny_model_folder

    folder = tiny_model_folder(tmp_path)
    with pytest.raises(ConfigError, match="an HMT backbone quantizes to int8"):
        quantize(str(tmp_path / "q"), str(folder), format="q4_0")
