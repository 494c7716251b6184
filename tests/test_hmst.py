"""HMST: routing and the balance loss by hand, grouped experts equal a per-token loop, the parallel scan
equals the sequential one (values and gradients, float64), the model equals a naive loop, carried
state equals one long call, the decoder equals the forward pass, presets construct with their sizes,
bad configs and checkpoints fail clearly, and `hiermem train hmst` resumes bit-exactly, generates and
serves."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.inference.generate import GenerationConfig, generate
from hiermem.models import load_model
from hiermem.models.hmst import HMST, PRESETS, HMSTConfig, HMSTState, MoE, chunked_scan
from hmst_reference import naive_forward, naive_moe, sequential_scan
from scratch_family import resumed_run_equals_straight_run, save_with_byte_tokenizer, session_memories

SMALL = dict(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, attention_window=5, num_experts=4, top_k=2,
             intermediate_size=12, ssm_every=1, ssm_state_size=4, ssm_expand=2, ssm_head_dim=8, ssm_chunk=4)


def tiny(dtype=torch.float64, seed=0, vocab=40, **kw) -> HMST:
    torch.manual_seed(seed)
    model = HMST(HMSTConfig(**{"vocab_size": vocab, **SMALL, **kw})).to(dtype)
    with torch.no_grad():  # move every parameter off its initial value; decisive router logits
        for name, p in model.named_parameters():
            p.add_((0.5 if "router" in name else 0.1) * torch.randn_like(p))
    return model.eval()


def ids(b, t, seed=1, vocab=40):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)


# --- mixture of experts ---------------------------------------------------------------------------
def test_routing_picks_the_top_k_experts_and_the_losses_match_a_hand_computation():
    moe = MoE(hidden=4, ffn=3, num_experts=4, top_k=2).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))  # router logits = the token itself
        moe.w_in.normal_(), moe.w_out.normal_()
    logits = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 0.0], [1.0, 0.0, 0.0, 2.5]]
    x = torch.tensor(logits, dtype=torch.float64)
    y, routing = moe(x[None])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    top = [sorted(range(4), key=lambda e: -p[e])[:2] for p in probs]
    assert routing.experts.tolist() == top == [[0, 1], [1, 2], [3, 0]]
    f = [sum(row.count(e) for row in top) / 6 for e in range(4)]  # share of the 6 assignments
    P = [sum(p[e] for p in probs) / 3 for e in range(4)]
    assert routing.balance_loss().item() == pytest.approx(4 * sum(fe * pe for fe, pe in zip(f, P)), rel=1e-12)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 3
    assert routing.z_loss().item() == pytest.approx(z, rel=1e-12)
    for t, chosen in enumerate(top):  # the output mixes exactly the chosen experts, gates renormalised
        gates = [probs[t][e] / sum(probs[t][c] for c in chosen) for e in chosen]
        expect = sum(g * moe.expert(e, x[t:t + 1])[0] for g, e in zip(gates, chosen))
        torch.testing.assert_close(y[0, t], expect, rtol=0, atol=1e-12)
    with torch.no_grad():  # an expert no token chose does not matter; a chosen one does
        moe.w_out[2].add_(1.0)
        assert torch.equal(moe(x[None])[0][0, [0, 2]], y[0, [0, 2]])
        assert not torch.allclose(moe(x[None])[0][0, 1], y[0, 1])
    uniform = MoE(hidden=4, ffn=3, num_experts=4, top_k=2).double()
    with torch.no_grad():  # balanced routing scores exactly 1
        uniform.router.weight.copy_(torch.eye(4))
    even = torch.tensor([[5.0, 4, 0, 0], [0, 0, 5, 4], [4, 5, 0, 0], [0, 0, 4, 5]], dtype=torch.float64)
    assert uniform(even[None])[1].balance_loss().item() == pytest.approx(1.0, rel=1e-12)


def test_grouped_experts_equal_a_per_token_loop_in_values_and_gradients():
    torch.manual_seed(0)
    moe = MoE(hidden=6, ffn=5, num_experts=5, top_k=3).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    y, routing = moe(x)
    ref, chosen = naive_moe(moe, x.flatten(0, 1))
    assert torch.equal(routing.experts, chosen)
    torch.testing.assert_close(y.flatten(0, 1), ref, rtol=0, atol=1e-12)
    inputs = [x, *moe.parameters()]
    w = torch.randn_like(ref)
    for a, b in zip(grads((y.flatten(0, 1) * w).sum(), inputs), grads((ref * w).sum(), inputs)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the scan ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("T, chunk", [(37, 8), (16, 16), (5, 64), (9, 1), (64, 7)])
def test_parallel_scan_equals_the_sequential_loop_in_values_and_gradients(T, chunk):
    g = torch.Generator().manual_seed(T)
    B, H, P, N = 2, 3, 4, 5

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    u, b, c, s0 = r(B, T, H, P), r(B, T, N), r(B, T, N), r(B, H, P, N)
    raw = r(B, T, H)
    log_a = -torch.nn.functional.softplus(raw) * 3  # decays from ~1 to ~e^-20 per step
    y, s = chunked_scan(u, log_a, b, c, s0, chunk)
    y_ref, s_ref = sequential_scan(u, log_a, b, c, s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(s, s_ref, rtol=1e-11, atol=1e-11)
    wy, ws = torch.randn_like(y), torch.randn_like(s)
    inputs = [u, raw, b, c, s0]
    for a, ref in zip(grads((y * wy).sum() + (s * ws).sum(), inputs),
                      grads((y_ref * wy).sum() + (s_ref * ws).sum(), inputs)):
        torch.testing.assert_close(a, ref, rtol=1e-9, atol=1e-10)


# --- the model ----------------------------------------------------------------------------------------
def test_the_model_equals_the_naive_loop_in_values_and_gradients():
    model = tiny()
    x = ids(2, 13)
    out = model(x, labels=x)
    ref, states = naive_forward(model, x)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.state.ssm, torch.stack(states, 1), rtol=0, atol=1e-12)
    w = torch.randn_like(ref)
    params = list(model.parameters())
    for (name, _), a, b in zip(model.named_parameters(), grads((out.logits * w).sum(), params),
                               grads((ref * w).sum(), params)):
        assert b is not None and b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_carried_state_equals_one_long_call_and_rows_reset_alone():
    model = tiny(attention_window=7)
    x = ids(2, 150)  # longer than one attention block (128 queries) and many scan chunks
    whole = model(x, labels=x)
    state, logits = None, []
    for chunk in x.split([1, 6, 40, 103], dim=1):
        part = model(chunk, state=state)
        state, logits = part.state, logits + [part.logits]
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=0, atol=1e-10)
    for name in ("keys", "values", "conv", "ssm"):
        torch.testing.assert_close(getattr(state, name), getattr(whole.state, name), rtol=0, atol=1e-10, msg=name)
    assert state.tokens == 150 and state.filled.tolist() == [6, 6]
    assert state.nbytes == model(x[:, :3]).state.nbytes  # constant memory whatever the length
    # a new document in row 0 only: that row reads as from an empty state, row 1 continues
    fresh = state.reset_rows(torch.tensor([True, False]), model.init_state(2))
    nxt = ids(2, 9, seed=5)
    out = model(nxt, state=fresh)
    torch.testing.assert_close(out.logits[0], model(nxt[:1]).logits[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out.logits[1], model(nxt[1:], state=state.select_rows(torch.tensor([1]))).logits[0],
                               rtol=0, atol=1e-10)


def test_the_decoder_equals_the_forward_pass():
    model = tiny()
    x = ids(2, 20)
    whole = model(x)
    dec = model.decoder(batch_size=2)
    steps = torch.stack([dec.feed(x[:, i]) for i in range(x.shape[1])], 1)  # float32 logits
    torch.testing.assert_close(steps, whole.logits.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(dec.state.ssm, whole.state.ssm, rtol=0, atol=1e-12)
    assert dec.tokens_seen == 20
    prompt = ids(1, 12, vocab=40)  # greedy generation = greedy over one forward pass
    a = generate(model.float(), prompt, GenerationConfig(max_new_tokens=5))
    ref = model(torch.cat([prompt, a.tokens[:, :-1]], 1)).logits[:, 11:].argmax(-1)
    assert torch.equal(ref, a.tokens) and a.decoder.state.tokens == 17


def test_bf16_autocast_trains_with_a_float32_scan():
    model = tiny(torch.float32).train()
    x = ids(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, return_logits=False)
    (out.loss + sum(out.aux.values())).backward()
    assert out.state.ssm.dtype == out.state.keys.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.loss, model(x, labels=x).loss, rtol=3e-2, atol=3e-2)


def test_auxiliary_losses_are_returned_and_weighted():
    model = tiny(balance_loss_weight=0.5, router_z_loss_weight=0.25)
    x = ids(2, 10)
    out = model(x, labels=x, return_logits=False)
    assert set(out.aux) == {"balance", "router_z"} and model.aux_weights == {"balance": 0.5, "router_z": 0.25}
    assert out.aux["balance"] >= 1.0 - 1e-9  # f . P >= 1/E whenever f and P agree on the busiest experts
    g = grads(out.aux["balance"] + out.aux["router_z"], [model.layers[0].moe.router.weight])[0]
    assert g.abs().sum() > 0


# --- presets and configs --------------------------------------------------------------------------
@pytest.mark.parametrize("name, total, active", [("micro", 10.0e6, 4.69e6), ("tiny", 100.4e6, 48.5e6),
                                                 ("small", 1.038e9, 0.415e9), ("base", 11.94e9, 4.01e9)])
def test_presets_construct_with_their_stated_sizes(name, total, active):
    from hiermem.configs import read_config
    from hiermem.training.cli import train_model

    options = read_config(train_model, f"hmst-{name}")
    assert {k: options["model_options"][k] for k in PRESETS[name]} == PRESETS[name]
    cfg = HMSTConfig(vocab_size=options["vocab_size"], **options["model_options"])
    assert cfg == HMSTConfig.preset(name, **{k: v for k, v in options["model_options"].items()
                                             if k not in PRESETS[name]})
    with torch.device("meta"):  # build without allocating (base: 12B parameters)
        model = HMST(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.param_count() and abs(n - total) / total < 0.01
    assert abs(cfg.param_count(active=True) - active) / active < 0.01
    assert options["carry_state"] is True


@pytest.mark.parametrize("bad, words", [
    ({"num_experts": 0}, "num_experts"),
    ({"top_k": 5}, "top_k"),
    ({"attention_window": 0}, "attention_window"),
    ({"hidden_size": 15}, "hidden_size"),
    ({"num_kv_heads": 3, "num_heads": 4, "hidden_size": 16}, "num_kv_heads"),
    ({"ssm_head_dim": 5}, "ssm_head_dim"),
    ({"ssm_every": -1}, "ssm_every"),
    ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
    ({"router_z_loss_weight": "x"}, "router_z_loss_weight"),
    ({"dropout": 1.0}, "dropout"),
    ({"eos_token_id": 40}, "eos_token_id"),
])
def test_bad_configs_name_the_field(bad, words):
    with pytest.raises(ConfigError, match=words):
        HMSTConfig(**{"vocab_size": 40, **SMALL, **bad})


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="huge"):
        HMSTConfig.preset("huge")


# --- persistence --------------------------------------------------------------------------------------
def _save(tmp_path, name="m", **kw):
    return save_with_byte_tokenizer(lambda v: tiny(torch.float32, vocab=v, **kw), tmp_path, name)


def test_save_load_round_trip_state_files_and_corrupt_checkpoints(tmp_path):
    model, tok = _save(tmp_path)
    x = torch.tensor([tok.encode("to be or not")])
    for loaded in (HMST.from_pretrained(tmp_path / "m"), load_model(tmp_path / "m")):
        assert isinstance(loaded, HMST) and loaded.config == model.config
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    state = model(x).state
    state.save(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    back = HMSTState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    assert all(torch.equal(getattr(back, k), getattr(state, k)) for k in ("keys", "values", "filled", "conv", "ssm"))
    other = tiny(torch.float32, vocab=len(tok), attention_window=3)
    with pytest.raises(CheckpointError):  # a state of another architecture
        HMSTState.load(tmp_path / "s.safetensors", fingerprint=other.fingerprint())

    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    weights.write_bytes(good)
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "num_experts": 5}))
    with pytest.raises(CheckpointError, match="shape|router|w_in"):
        load_model(tmp_path / "m")
    cfg_file.write_text(json.dumps({**cfg, "ssm_every": 0}))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(tmp_path / "m")


def test_train_command_resumes_bit_exactly_generates_and_serves(tmp_path):
    """`hiermem train hmst` with carried state: 6 steps at once equal 3 steps, then a resumed run to 6
    (constant schedule); the result loads, generates and answers as a served model with a session."""
    summary = resumed_run_equals_straight_run(
        tmp_path, "hmst", "hmst-micro",
        ["hidden_size=16", "num_layers=2", "num_heads=2", "attention_window=6", "intermediate_size=16",
         "num_experts=4", "ssm_head_dim=8", "ssm_state_size=4", "ssm_chunk=8"], steps=6, window=16)
    assert summary["steps"] == 6 and summary["model"]["attention_window"] == 6
    assert summary["train_config"]["carry_state"]
    last = summary["val_history"][-1]
    assert [e["step"] for e in summary["val_history"]] == [3, 6] and "val_balance" in last and "val_router_z" in last

    model = load_model(tmp_path / "b" / "final")
    tok = model.tokenizer
    out = generate(model, torch.tensor([tok.encode("O Romeo")]), GenerationConfig(max_new_tokens=5))
    assert out.tokens.shape == (1, 5)
    memory = session_memories(model, "hmst", ["O Romeo", ", Romeo"])[-1]
    assert memory["tokens"] >= len(tok.encode("O Romeo")) + len(tok.encode(", Romeo")) + 4
