"""HMST's compute gates (``skip_ssm``, ``exit_layer``, ``expert_bias``): closed by default they change
nothing; open they equal the naive loop with the same gate; gated calls carrying the state equal one
call; the skipped parts' state is kept or, for early-exited layers' windows, projected from the exit
hidden state; ssm_drop and the early-exit loss train them; ``out.compute`` reports what a call ran;
checkpoints saved without expert biases still load."""

from __future__ import annotations

import json

import pytest
import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import load_tensors, save_tensors
from hiermem.models import load_model
from hiermem.models.hmst import HMST, HMSTConfig, MoE
from hmst_reference import naive_forward, naive_hidden, naive_moe
from scratch_family import resumed_run_equals_straight_run, save_with_byte_tokenizer
from test_hmst import SMALL, grads, ids, tiny

STATE = ("keys", "values", "filled", "conv", "ssm")


def same_state(a, b, atol=0.0):
    for name in STATE:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol, msg=name)


def biased(**kw) -> HMST:
    """A tiny model with expert biases, pushed toward expert 3 in every layer."""
    model = tiny(expert_bias=True, **kw)
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.expert_bias.copy_(torch.tensor([0.0, -0.5, 0.2, 2.0], dtype=torch.float64))
    return model


# --- defaults -------------------------------------------------------------------------------------
def test_closed_gates_and_full_depth_equal_the_default_call_bit_for_bit():
    model = biased()
    x, prefix = ids(2, 11), ids(2, 6, seed=3)
    state = model(prefix).state
    plain = model(x, state=state, labels=x)
    for gates in ({"skip_ssm": False, "exit_layer": None, "expert_bias": False}, {"exit_layer": 2}):
        out = model(x, state=state, labels=x, **gates)
        assert torch.equal(out.logits, plain.logits) and torch.equal(out.loss, plain.loss)
        assert all(torch.equal(out.aux[k], plain.aux[k]) for k in plain.aux)
        same_state(out.state, plain.state)
    with torch.no_grad():  # zero biases: the open gate changes nothing
        for layer in model.layers:
            layer.moe.expert_bias.zero_()
    assert torch.equal(model(x, state=state, expert_bias=True).logits, model(x, state=state).logits)
    assert plain.compute == {"layers": 2, "ssm_blocks": 2, "experts_per_token": 2,
                             "flops_per_token": model.config.macs_per_token()}


# --- each gate against the naive loop ----------------------------------------------------------
def test_skip_ssm_equals_the_model_without_its_ssm_blocks_and_keeps_their_state():
    model = tiny()
    x = ids(2, 9)
    out = model(x, skip_ssm=True)
    ref, states = naive_forward(model, x, skip_ssm=True)
    assert states == []
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-12)
    silent = tiny()
    with torch.no_grad():  # SSM blocks that add nothing to the residual stream
        for layer in silent.layers:
            layer.ssm.out_proj.weight.zero_()
    assert torch.equal(out.logits, silent(x).logits)
    # after a prefix, a skipped call leaves conv and scan states as they were, windows move on
    state = model(ids(2, 6, seed=3)).state
    skipped = model(x, state=state, skip_ssm=True).state
    assert torch.equal(skipped.conv, state.conv) and torch.equal(skipped.ssm, state.ssm)
    assert not torch.equal(skipped.keys, state.keys) and skipped.tokens == state.tokens + 9


@pytest.mark.parametrize("k", [1, 2])
def test_exit_layer_reads_the_head_after_k_layers_and_fills_later_windows_from_it(k):
    model = tiny(num_layers=3, ssm_every=2)  # an SSM block in layer 1 only
    x = ids(2, 3)  # fewer tokens than the window's 4 slots
    out = model(x, exit_layer=k, labels=x)
    h_exit, _ = naive_hidden(model, x, layers=k)
    torch.testing.assert_close(out.logits, naive_forward(model, x, layers=k)[0], rtol=0, atol=1e-12)
    full = model(x)
    assert torch.equal(out.state.keys[:, :k], full.state.keys[:, :k])  # layers run are unchanged
    for layer_index in range(k, 3):  # CALM-style: k_proj, v_proj of attn_norm(h_exit)
        layer = model.layers[layer_index]
        a = layer.attn_norm(h_exit)
        for proj, window in ((layer.attn.k_proj, out.state.keys), (layer.attn.v_proj, out.state.values)):
            expect = proj(a).view(2, 3, 1, 8).transpose(1, 2)  # (B, G, T, hd)
            torch.testing.assert_close(window[:, layer_index, :, 1:], expect, rtol=0, atol=1e-12)
            assert not window[:, layer_index, :, 0].any()  # the slot before the first token: empty
    assert torch.equal(out.state.ssm, full.state.ssm) == (k == 2)  # layer 1's SSM runs iff k == 2
    if k == 1:
        assert not out.state.ssm.any() and not out.state.conv.any()
    assert out.compute["layers"] == k and out.compute["ssm_blocks"] == k - 1


@pytest.mark.parametrize("gates", [{}, {"skip_ssm": True}, {"exit_layer": 1}, {"expert_bias": True},
                                   {"skip_ssm": True, "exit_layer": 2, "expert_bias": True}])
def test_one_call_equals_token_by_token_calls_with_each_gate(gates):
    model = biased(num_layers=3)
    prefix, x = ids(2, 4, seed=7), ids(2, 9)
    start = model(prefix).state  # a nonempty state: skipped SSM states must carry it unchanged
    whole = model(x, state=start, **gates)
    state, logits = start, []
    for t in range(x.shape[1]):
        part = model(x[:, t:t + 1], state=state, **gates)
        state, logits = part.state, logits + [part.logits]
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=0, atol=1e-10)
    same_state(state, whole.state, atol=1e-10)
    assert state.tokens == whole.state.tokens == 13
    kept = 0 if gates.get("skip_ssm") else gates.get("exit_layer", 3)  # SSM blocks (one per layer) not run
    for name in ("conv", "ssm"):
        new, old = getattr(whole.state, name), getattr(start, name)
        assert new.shape == old.shape and torch.equal(new[:, kept:], old[:, kept:])
        assert not torch.equal(new[:, :kept], old[:, :kept]) or kept == 0


def test_expert_bias_shifts_routing_to_the_favoured_expert_and_only_it_learns_when_open():
    torch.manual_seed(0)
    moe = MoE(hidden=6, ffn=5, num_experts=4, top_k=2, expert_bias=True).double()
    for p in (moe.router.weight, moe.w_in, moe.w_out):
        torch.nn.init.normal_(p)
    x = torch.randn(1, 40, 6, dtype=torch.float64)
    before = moe(x)[1].experts
    with torch.no_grad():
        moe.expert_bias[3] = 1.5
    after = moe(x, bias=True)[1].experts
    assert torch.equal(moe(x)[1].experts, before)  # closed: the bias plays no part
    chose = (before == 3).any(1)
    assert (after == 3).any(1).sum() > chose.sum() and (after == 3).any(1)[chose].all()
    y, routing = moe(x, bias=True)
    ref, chosen = naive_moe(moe, x[0], bias=True)
    assert torch.equal(routing.experts, chosen)
    torch.testing.assert_close(y[0], ref, rtol=0, atol=1e-12)
    # through the model: equal to the naive loop; the bias gets a gradient only with the gate open
    model = biased()
    x = ids(2, 8)
    out = model(x, expert_bias=True)
    ref = naive_forward(model, x, expert_bias=True)[0]
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(out.logits, model(x).logits)
    bias = [layer.moe.expert_bias for layer in model.layers]
    w = torch.randn_like(ref)
    for a, b in zip(grads((out.logits * w).sum(), bias), grads((ref * w).sum(), bias)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert grads(model(x).logits.sum(), bias) == (None, None)


# --- training -------------------------------------------------------------------------------------
def test_ssm_drop_skips_the_ssm_per_training_call_reproducibly():
    model = tiny(ssm_drop=1.0)
    x = ids(2, 7)
    torch.testing.assert_close(model.train()(x).logits, model.eval()(x, skip_ssm=True).logits, rtol=0, atol=0)
    assert model.eval()(x).compute["ssm_blocks"] == 2  # evaluation ignores ssm_drop
    half = tiny(ssm_drop=0.5).train()

    def draws(seed):
        torch.manual_seed(seed)
        return [half(x[:, :2]).compute["ssm_blocks"] for _ in range(24)]

    first = draws(5)
    assert first == draws(5) and set(first) == {0, 2}


def test_early_exit_loss_is_the_exit_heads_loss_weighted_and_trains_only_the_layers_below():
    model = tiny(num_layers=3, early_exit_layer=1, early_exit_loss_weight=0.3)
    x = ids(2, 10)
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    assert model.aux_weights == {"balance": 0.01, "router_z": 0.001, "early_exit": 0.3}
    torch.testing.assert_close(out.aux["early_exit"], model(x, labels=labels, exit_layer=1).loss, rtol=1e-12, atol=0)
    assert out.logits.shape == (2, 10, 40) and out.compute["layers"] == 3  # the full depth still runs
    upper = [p for layer in model.layers[1:] for p in layer.parameters()]
    lower = list(model.layers[0].parameters()) + [model.embedding.weight, model.norm.weight]
    assert all(g is None for g in grads(out.aux["early_exit"], upper))
    g = dict(zip([id(p) for p in lower], grads(out.aux["early_exit"], lower)))
    assert all(g[id(p)] is not None for p in lower)
    attn = model.layers[0].attn
    assert all(g[id(p)].abs().sum() > 0 for p in (attn.q_proj.weight, attn.o_proj.weight, model.embedding.weight))
    assert "early_exit" not in model(x).aux  # without labels
    assert "early_exit" not in tiny(num_layers=3, early_exit_layer=1)(x, labels=x).aux  # weight 0
    assert "early_exit" not in tiny()(x, labels=x).aux and "early_exit" not in tiny().aux_weights


# --- compute, errors, configs -----------------------------------------------------------------
def test_compute_figures_fall_with_early_exit_and_skipped_ssm():
    model = tiny()
    x = ids(1, 4)
    # per layer: attention 2*16*16 + 2*16*8 + 2*16*5 = 928, router and 2 experts 64 + 2*3*16*12 = 1216;
    # SSM block: 16*76 + 40*4 + 2*32*4 + 32*16 = 2144; skipped layer's k, v: 256; head: 16*40 = 640
    full, exit1, skip = model(x).compute, model(x, exit_layer=1).compute, model(x, skip_ssm=True).compute
    assert full["flops_per_token"] == 2 * (928 + 1216) + 2 * 2144 + 640 == 9216
    assert exit1 == {"layers": 1, "ssm_blocks": 1, "experts_per_token": 2,
                     "flops_per_token": 928 + 1216 + 256 + 2144 + 640}
    assert skip == {"layers": 2, "ssm_blocks": 0, "experts_per_token": 2, "flops_per_token": 9216 - 2 * 2144}
    both = model(x, exit_layer=1, skip_ssm=True).compute["flops_per_token"]
    assert both < min(exit1["flops_per_token"], skip["flops_per_token"])


@pytest.mark.parametrize("bad", [0, 3, -1, 1.5, True, "1"])
def test_bad_exit_layers_are_config_errors(bad):
    with pytest.raises(ConfigError, match=r"exit_layer must be None or an integer in \[1, num_layers=2\]"):
        tiny()(ids(1, 3), exit_layer=bad)


def test_the_expert_bias_gate_changes_nothing_in_a_model_without_biases():
    model, x = tiny(), ids(2, 6)
    assert torch.equal(model(x, expert_bias=True).logits, model(x).logits)


@pytest.mark.parametrize("bad, words", [
    ({"early_exit_layer": 2}, "early_exit_layer 2 must be below num_layers"),
    ({"early_exit_layer": 0}, "early_exit_layer"),
    ({"early_exit_loss_weight": 0.1}, "needs early_exit_layer"),
    ({"early_exit_loss_weight": -1.0, "early_exit_layer": 1}, "early_exit_loss_weight"),
    ({"ssm_drop": 1.5}, "ssm_drop"),
    ({"expert_bias": 1}, "expert_bias"),
])
def test_bad_gate_configs_name_the_field(bad, words):
    with pytest.raises(ConfigError, match=words):
        HMSTConfig(**{"vocab_size": 40, **SMALL, **bad})


def test_gate_settings_leave_the_state_fingerprint_and_the_size_as_they_were():
    cfg = HMSTConfig(vocab_size=40, **SMALL)
    gated = cfg.replace(ssm_drop=0.2, early_exit_layer=1, early_exit_loss_weight=0.1, expert_bias=True)
    assert HMST(gated).fingerprint() == HMST(cfg).fingerprint()  # states saved before still load
    assert sum(p.numel() for p in HMST(gated).parameters()) == gated.param_count() == cfg.param_count() + 2 * 4


# --- old checkpoints ------------------------------------------------------------------------------
def test_a_checkpoint_without_expert_biases_loads_with_zero_biases(tmp_path):
    def make(vocab):
        model = tiny(torch.float32, vocab=vocab, expert_bias=True)
        with torch.no_grad():
            for layer in model.layers:
                layer.moe.expert_bias.zero_()
        return model

    model, tok = save_with_byte_tokenizer(make, tmp_path)
    folder = tmp_path / "m"
    tensors, meta = load_tensors(folder / "model.safetensors")
    old = {k: v for k, v in tensors.items() if "expert_bias" not in k}
    assert len(old) == len(tensors) - 2
    save_tensors(folder / "model.safetensors", old, meta)
    cfg = json.loads((folder / "config.json").read_text())
    old_cfg = {k: v for k, v in cfg.items() if k not in ("expert_bias", "ssm_drop", "early_exit_layer",
                                                         "early_exit_loss_weight")}
    (folder / "config.json").write_text(json.dumps(old_cfg))  # a folder written before the gates
    x = torch.tensor([tok.encode("to be or not")])
    want = model(x).logits
    plain = load_model(folder)
    assert plain.config.expert_bias is False and torch.equal(plain(x).logits, want)
    with_bias = load_model(folder, expert_bias=True)
    assert all(not layer.moe.expert_bias.any() for layer in with_bias.layers)
    assert torch.equal(with_bias(x, expert_bias=True).logits, want) and torch.equal(with_bias(x).logits, want)
    with pytest.raises(CheckpointError, match="missing"):  # other tensors are still required
        save_tensors(folder / "model.safetensors", {k: v for k, v in old.items() if "router" not in k}, meta)
        load_model(folder)


def test_train_command_with_the_gates_resumes_bit_exactly_and_reports_the_early_exit_loss(tmp_path):
    """ssm_drop draws from the seeded RNG (a resumed run equals a straight one); the trainer weighs
    and reports the early-exit loss."""
    summary = resumed_run_equals_straight_run(
        tmp_path, "hmst", "hmst-micro",
        ["hidden_size=16", "num_layers=2", "num_heads=2", "attention_window=6", "intermediate_size=16",
         "num_experts=4", "ssm_head_dim=8", "ssm_state_size=4", "ssm_chunk=8", "ssm_drop=0.5", "early_exit_layer=1",
         "early_exit_loss_weight=0.2", "expert_bias=true"], steps=6, window=16)
    assert summary["model"]["ssm_drop"] == 0.5 and summary["model"]["expert_bias"] is True
    assert all(e["val_early_exit"] > 0 for e in summary["val_history"])
