"""Hierarchos: one set of dynamics (teacher forcing = token-by-token decoding = chunked calls, in
logits, halting decisions and memory), the fast path equals the naive loop in values and gradients,
ACT / worker convergence / the surprise update follow their formulas, configs and checkpoints fail
clearly, and `hiermem train hierarchos` resumes bit-exactly, generates and serves a learning session."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hiermem.errors import CheckpointError, ConfigError
from hiermem.inference.generate import GenerationConfig, generate
from hiermem.models import load_model
from hiermem.models.hierarchos import Hierarchos, HierarchosConfig, HierarchosState
from hierarchos_reference import naive_forward
from scratch_family import resumed_run_equals_straight_run, save_with_byte_tokenizer, session_memories

SMALL = dict(vocab_size=40, context_dim=8, persistent_dim=4, ltm_slots=10, ltm_key_dim=6, ltm_val_dim=5, ltm_topk=3,
             h_hidden=7, l_hidden=9, h_stride=3, max_h_steps=4, max_l_steps=3, ltm_lr=0.5, ltm_forget=0.05,
             h_halt_thresh=0.7, commitment_threshold=0.0)


def tiny(dtype=torch.float64, seed=0, **kw) -> Hierarchos:
    torch.manual_seed(seed)
    model = Hierarchos(HierarchosConfig(**{**SMALL, **kw})).to(dtype)
    with torch.no_grad():  # move every parameter off its initial value (gains of 1, zero biases)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def ids(b, t, seed=1, vocab=40):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_states_equal(a: HierarchosState, b: HierarchosState, atol=1e-12):
    ta, tb = a.named_tensors(), b.named_tensors()
    assert ta.keys() == tb.keys() and a.tokens == b.tokens
    for name in ta:
        torch.testing.assert_close(ta[name][0], tb[name][0], rtol=0, atol=atol, msg=name)


def warm_state(model, b=2, t=7, seed=5):
    """A state after reading some tokens (memory written, contexts set, clock off the stride phase)."""
    return model(ids(b, t, seed=seed)).state.detach()


@pytest.mark.parametrize("kw", [{}, dict(h_stride=1, max_h_steps=2, max_l_steps=1, ltm_topk=2, h_halt_thresh=0.99, tie_embeddings=False),
                                dict(h_stride=4, l_conv_atol=0.5, h_halt_thresh=0.95, ltm_forget=0.0)])
def test_fast_path_equals_the_naive_loop_in_values_and_gradients(kw):
    model = tiny(**kw)
    start = warm_state(model)
    x = ids(2, 9)
    out = model(x, state=start, labels=x, return_trace=True)
    ref_logits, finals, traces = naive_forward(model, x, start)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-11)
    fast, mom = model.ltm_contents(out.state)
    for b, fin in enumerate(finals):
        torch.testing.assert_close(fast[b], fin["fast"], rtol=0, atol=1e-11)
        torch.testing.assert_close(mom[b], fin["mom"], rtol=0, atol=1e-11)
        assert out.state.ltm_time[b].tolist() == fin["stamp"]
        torch.testing.assert_close(out.state.manager[b], fin["manager"], rtol=0, atol=1e-11)
        torch.testing.assert_close(out.state.target_context[b], fin["target_context"], rtol=0, atol=1e-11)
        assert out.trace["h_steps"][b].tolist() == [i["h_steps"] for i in traces[b]]
        assert out.trace["l_steps"][b].tolist() == [i["l_steps"] for i in traces[b]]
        assert out.trace["ltm_index"][b].tolist() == [i["ltm_index"] for i in traces[b]]
    # gradients of a loss reaching the logits, both auxiliary losses and the memory it leaves
    flat = [i for row in traces for i in row]

    def mean(values):
        return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).mean()
    ref_aux = {"ponder": mean(i["ponder"] for i in flat if i["plan"]), "commitment": mean(i["commitment"] for i in flat)}
    for k in ref_aux:
        torch.testing.assert_close(out.aux[k], ref_aux[k], rtol=0, atol=1e-12)
    ref_mem = torch.stack([fin["fast"] for fin in finals])
    fast_obj = out.loss + out.aux["ponder"] + out.aux["commitment"] + fast.square().sum()
    ref_nll = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    slow_obj = ref_nll + ref_aux["ponder"] + ref_aux["commitment"] + ref_mem.square().sum()
    params = dict(model.named_parameters())
    g_fast = torch.autograd.grad(fast_obj, list(params.values()), allow_unused=True)
    g_slow = torch.autograd.grad(slow_obj, list(params.values()), allow_unused=True)
    reached = 0
    for name, a, b in zip(params, g_fast, g_slow):
        a = torch.zeros_like(params[name]) if a is None else a
        b = torch.zeros_like(params[name]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
        reached += bool(b.abs().sum() > 0)
    assert reached == len(params)  # every parameter learns


def test_decoder_token_by_token_equals_teacher_forcing():
    """Logits, halting decisions, worker steps, memory reads and the final state (LTM included)."""
    model = tiny()
    x = ids(2, 14)
    whole = model(x, return_trace=True)
    dec = model.decoder(batch_size=2)
    steps = torch.stack([dec.feed(x[:, i]) for i in range(x.shape[1])], 1)
    torch.testing.assert_close(steps, whole.logits.float(), rtol=0, atol=1e-6)
    assert_states_equal(dec.state, whole.state)
    state, traces = None, []
    for i in range(x.shape[1]):  # what the decoder does, with the trace kept
        part = model(x[:, i:i + 1], state=state, return_trace=True)
        state, traces = part.state, traces + [part.trace]
    for key in ("plan", "h_steps", "l_steps", "ltm_index"):
        assert torch.equal(torch.cat([t[key] for t in traces], 1), whole.trace[key]), key
    for key in ("halt_probs", "ltm_weight", "ltm_target"):
        torch.testing.assert_close(torch.cat([t[key] for t in traces], 1), whole.trace[key], rtol=0, atol=1e-12)
    assert int(whole.trace["h_steps"].max()) > 1 and bool((whole.state.ltm_time >= 0).any())


def test_chunked_calls_carrying_the_state_equal_one_call():
    model = tiny()
    x = ids(2, 23)
    whole = model(x, labels=x)
    state, logits = None, []
    for chunk in torch.split(x, [5, 1, 4, 7, 6], dim=1):
        part = model(chunk, state=state)
        state, logits = part.state, logits + [part.logits]
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=0, atol=1e-12)
    assert_states_equal(state, whole.state)
    assert state.tokens == 23 and state.clock.tolist() == [23, 23]
    # a state survives a file round trip, and rows can restart (a new document in a carried stream)
    fresh = model.init_state(2)
    mixed = state.reset_rows(torch.tensor([True, False]), fresh)
    assert torch.equal(mixed.ltm_time[0], fresh.ltm_time[0]) and torch.equal(mixed.ltm_fast[1], state.ltm_fast[1])
    assert mixed.clock.tolist() == [0, 23]


def test_act_halts_within_max_h_steps_and_costs_the_expected_steps():
    model = tiny(max_h_steps=4).requires_grad_(False)
    x = ids(3, 16)
    out = model(x, return_trace=True)
    tr = out.trace
    plan, steps, probs = tr["plan"], tr["h_steps"], tr["halt_probs"]
    assert bool(plan.any()) and torch.equal(steps > 0, plan)
    assert int(steps.max()) <= 4
    for b, t in plan.nonzero().tolist():
        n, p = int(steps[b, t]), probs[b, t].tolist()
        survival = [1.0]
        for pi in p:
            survival.append(survival[-1] * (1 - pi))
        assert all(pi == 0 for pi in p[n:])  # no halting probability past the halting step
        halted = [1 - s >= model.config.h_halt_thresh for s in survival[1:n + 1]]
        assert n == 4 or (halted[-1] and not any(halted[:-1]))  # halts at the first step over the threshold
        assert abs(float(tr["ponder"][b, t]) - sum(survival[:n])) < 1e-12  # expected steps
    torch.testing.assert_close(out.aux["ponder"], tr["ponder"][plan].mean(), rtol=0, atol=1e-12)
    assert set(steps[plan].tolist()) != {4}  # some halted early
    eager = tiny(max_h_steps=4, h_halt_thresh=1e-9).requires_grad_(False)(x, return_trace=True)
    assert set(eager.trace["h_steps"][plan].tolist()) == {1} and float(eager.aux["ponder"]) == 1.0
    never = tiny(max_h_steps=4, h_halt_thresh=1.0).requires_grad_(False)(x, return_trace=True)
    assert set(never.trace["h_steps"][plan].tolist()) == {4} and float(never.aux["ponder"]) > 1.0


def test_worker_stops_at_the_convergence_tolerance():
    x = ids(2, 12)
    model = tiny(max_l_steps=4, l_conv_atol=0.0)
    _, _, traces = naive_forward(model, x)
    changes = sorted(c for row in traces for i in row for c in i["l_changes"])
    atol = changes[len(changes) // 2]  # about half of the steps change less than this
    model = tiny(max_l_steps=4, l_conv_atol=atol)
    out = model(x, return_trace=True)
    _, _, traces = naive_forward(model, x)
    for b, row in enumerate(traces):
        for t, info in enumerate(row):
            below = [n + 1 for n, c in enumerate(info["l_changes"]) if c < atol]
            assert info["l_steps"] == (below[0] if below else 4)
            assert int(out.trace["l_steps"][b, t]) == info["l_steps"]
    assert len(set(out.trace["l_steps"].flatten().tolist())) > 1  # some rows stop early, some do not
    assert set(tiny(max_l_steps=4, l_conv_atol=1e9)(x, return_trace=True).trace["l_steps"].flatten().tolist()) == {1}
    assert set(tiny(max_l_steps=4, l_conv_atol=0.0)(x, return_trace=True).trace["l_steps"].flatten().tolist()) == {4}


def test_one_ltm_update_with_momentum_and_decay_matches_a_hand_computed_step():
    c = dict(ltm_lr=0.3, ltm_momentum=0.8, ltm_forget=0.1, ltm_clamp=20.0)
    model = tiny(**c)
    state = model.init_state(1)
    g = torch.Generator().manual_seed(3)
    S, V = model.config.ltm_slots, model.config.ltm_val_dim
    state.ltm_fast = torch.randn(1, S, V, generator=g, dtype=torch.float64)
    state.ltm_mom = torch.randn(1, S, V, generator=g, dtype=torch.float64)
    state.ltm_time = torch.randint(0, 9, (1, S), generator=g)
    state.ltm_time[0, ::3] = -1  # never written: zeros
    state.ltm_fast[0, ::3], state.ltm_mom[0, ::3] = 0.0, 0.0
    state.clock = torch.tensor([10])
    with torch.no_grad():  # generation: the memory learns without autograd
        out = model(ids(1, 1), state=state, return_trace=True)
    idx, a = out.trace["ltm_index"][0, 0].tolist(), out.trace["ltm_weight"][0, 0]
    r, v = out.trace["ltm_read"][0, 0], out.trace["ltm_target"][0, 0]
    beta, rho, lr = 0.8, 0.9, 0.3
    slow = model.ltm.vals.detach()
    read = sum(a[j] * (slow[s] + rho ** (10 - 1 - int(state.ltm_time[0, s])) * state.ltm_fast[0, s])
               for j, s in enumerate(idx))
    torch.testing.assert_close(r, read, rtol=0, atol=1e-12)  # r = sum_j a_j M_{t-1}[s_j]
    new = out.state
    for j, s in enumerate(idx):
        age = 10 - int(state.ltm_time[0, s])
        mom = (beta ** age * state.ltm_mom[0, s] + a[j] * (r - v)).clamp(-50, 50)
        fast = (rho ** age * state.ltm_fast[0, s] - lr * mom).clamp(-20, 20)
        torch.testing.assert_close(new.ltm_mom[0, s], mom, rtol=0, atol=1e-12)
        torch.testing.assert_close(new.ltm_fast[0, s], fast, rtol=0, atol=1e-12)
        assert int(new.ltm_time[0, s]) == 10
    others = [s for s in range(S) if s not in idx]
    assert torch.equal(new.ltm_fast[0, others], state.ltm_fast[0, others])  # stored lazily: decay on read
    dense, _ = model.ltm_contents(new)
    old, _ = model.ltm_contents(state)
    torch.testing.assert_close(dense[0, others], rho * old[0, others], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad, field", [
    ({"ltm_topk": 11}, "ltm_topk"),
    ({"ltm_slots": 0}, "ltm_slots"),
    ({"h_stride": 0}, "h_stride"),
    ({"max_l_steps": 1.5}, "max_l_steps"),
    ({"ltm_momentum": 1.0}, "ltm_momentum"),
    ({"ltm_forget": -0.1}, "ltm_forget"),
    ({"h_halt_thresh": 0.0}, "h_halt_thresh"),
    ({"l_conv_atol": "small"}, "l_conv_atol"),
    ({"commitment_threshold": -1}, "commitment_threshold"),
    ({"ltm_clamp": 0}, "ltm_clamp"),
    ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ({"dropout": 1.0}, "dropout"),
    ({"eos_token_id": 40}, "eos_token_id"),
])
def test_bad_configs_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        HierarchosConfig(**{**SMALL, **bad})


def test_bundled_recipe_constructs():
    from hiermem.configs import read_config
    from hiermem.training.cli import train_model

    options = read_config(train_model, "hierarchos-cpu")
    with torch.device("meta"):
        model = Hierarchos(HierarchosConfig(vocab_size=options["vocab_size"], **options["model_options"]))
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6 and options["carry_state"] is True


def _save(tmp_path, name="m"):
    return save_with_byte_tokenizer(lambda v: tiny(torch.float32, vocab_size=v), tmp_path, name)


def test_save_load_round_trip_state_files_and_corrupt_checkpoints(tmp_path):
    model, tok = _save(tmp_path)
    x = torch.tensor([tok.encode("to be or not")])
    for loaded in (Hierarchos.from_pretrained(tmp_path / "m"), load_model(tmp_path / "m")):
        assert isinstance(loaded, Hierarchos) and loaded.config == model.config
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    state = model(x).state
    state.save(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    back = HierarchosState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    assert back.fingerprint() == state.fingerprint() and back.ltm_time.dtype == torch.long
    # run-time knobs keep a saved state readable; a different memory shape does not
    assert load_model(tmp_path / "m", ltm_lr=0.1, h_halt_thresh=0.5).fingerprint() == model.fingerprint()
    other = tiny(torch.float32, vocab_size=len(tok), ltm_slots=12)
    with pytest.raises(CheckpointError):
        HierarchosState.load(tmp_path / "s.safetensors", fingerprint=other.fingerprint())
    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    weights.write_bytes(good)
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "ltm_val_dim": cfg["ltm_val_dim"] + 1}))
    with pytest.raises(CheckpointError, match="shape|ltm"):
        load_model(tmp_path / "m")


def test_bf16_autocast_trains_with_a_full_precision_recurrence():
    model = tiny(torch.float32).train()
    x = ids(2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, return_logits=False)
    (out.loss + out.aux["ponder"] + out.aux["commitment"]).backward()
    assert out.state.ltm_fast.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_train_command_resumes_bit_exactly_generates_and_serves_a_learning_session(tmp_path):
    """`hiermem train hierarchos` with carried state: 4 steps at once equal 2 steps, then a resumed
    run to 4; the result generates, and a served session's memory (tokens, written slots) grows."""
    summary = resumed_run_equals_straight_run(
        tmp_path, "hierarchos", "hierarchos-cpu",
        ["context_dim=8", "persistent_dim=4", "ltm_slots=16", "ltm_key_dim=4", "ltm_val_dim=4", "ltm_topk=2",
         "h_hidden=8", "l_hidden=8", "max_h_steps=2", "max_l_steps=2"], steps=4, window=12, repeats=30)
    assert summary["steps"] == 4 and summary["model"]["n_ctx"] == 12 and summary["train_config"]["carry_state"]
    assert {"val_ponder", "val_commitment"} <= set(summary["val_history"][-1])

    model = load_model(tmp_path / "b" / "final")
    tok = model.tokenizer
    out = generate(model, torch.tensor([tok.encode("O Romeo")]), GenerationConfig(max_new_tokens=5))
    assert out.tokens.shape == (1, 5) and out.decoder.state.tokens == len(tok.encode("O Romeo")) + 5
    first, second = session_memories(model, "hierarchos", ["O Romeo", ", wherefore art thou"])
    assert second["tokens"] > first["tokens"] >= len(tok.encode("O Romeo"))
    assert second["clock"] == second["tokens"] and second["ltm_slots_written"] >= first["ltm_slots_written"] > 0
    assert second["ltm_fast_norm"] != first["ltm_fast_norm"]  # the memory learned from the second prompt
