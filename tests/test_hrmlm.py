"""HRMLM: the fast recurrence equals the plain per-token loop (values and gradients), carried state
equals one long pass, generation consumes the whole prompt, recipes construct, training resumes
bit-exactly, and bad checkpoints or tokenizers fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hiermem.errors import CheckpointError, ConfigError
from hiermem.inference.generate import GenerationConfig, apply_repetition_penalty, generate
from hiermem.models import load_model
from hiermem.models.hrmlm import HRMLM, HRMLMConfig, HRMLMState, recurrence
from hrmlm_reference import naive_forward
from scratch_family import resumed_run_equals_straight_run, save_with_byte_tokenizer, session_memories

DIMS = [  # (n_embd, n_hidden, n_high_hidden, T, N)
    (8, 12, 6, 2, 3),
    (5, 7, 7, 1, 1),
    (6, 4, 9, 3, 2),
]


def tiny(dtype=torch.float64, seed=0, vocab=40, **kw) -> HRMLM:
    torch.manual_seed(seed)
    cfg = {"vocab_size": vocab, "n_embd": 8, "n_hidden": 12, "n_high_hidden": 6, "T": 2, "N": 2, **kw}
    model = HRMLM(HRMLMConfig(**cfg)).to(dtype)
    with torch.no_grad():  # move every parameter off its initial value (norm gains of 1, zero biases)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids(b, t, seed=1, vocab=40):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("dims", DIMS)
def test_fast_path_equals_the_naive_loop_in_values_and_gradients(dims, layer_norm, split, monkeypatch):
    """split: the per-step products as two-core batched halves (the path taken with 2+ threads)."""
    monkeypatch.setattr(recurrence, "SPLIT", split)
    E, Hl, Hh, T, N = dims
    model = tiny(n_embd=E, n_hidden=Hl, n_high_hidden=Hh, T=T, N=N, layer_norm=layer_norm)
    x = ids(3, 7)
    start = model.init_state(3)
    low0, high0 = torch.randn_like(start.low).requires_grad_(), torch.randn_like(start.high).requires_grad_()
    out = model(x, state=HRMLMState(low=low0, high=high0), labels=x, return_states=True)
    ref_logits, ref_lows, ref_highs, (ref_low, ref_high) = naive_forward(model, x, low0, high0)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.low_states, ref_lows, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.high_states, ref_highs, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.state.low, ref_low, rtol=0, atol=1e-12)
    # a loss that reaches the logits, every per-token state and the final state
    inputs = [low0, high0, *model.parameters()]
    fast = out.loss + out.low_states.square().mean() + out.state.high.sum()
    ref_loss = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    slow = ref_loss + ref_lows.square().mean() + ref_high.sum()
    for (name, a), b in zip([("low0", 0), ("high0", 0), *model.named_parameters()],
                            zip(torch.autograd.grad(fast, inputs), torch.autograd.grad(slow, inputs))):
        g_fast, g_slow = b
        assert g_slow.abs().sum() > 0, name
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-10, msg=name)


def test_carried_state_over_windows_equals_one_long_pass():
    model = tiny(n_hidden=10, n_high_hidden=7)
    x = ids(2, 23)
    whole = model(x, labels=x)
    state, logits = None, []
    for chunk in x.split(5, dim=1):
        part = model(chunk, state=state)
        state, logits = part.state, logits + [part.logits]
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.high, whole.state.high, rtol=0, atol=1e-12)
    assert state.tokens == whole.state.tokens == 23
    dec = model.decoder(batch_size=2)  # the decoder, token by token (its logits are float32)
    steps = torch.stack([dec.feed(x[:, i]) for i in range(x.shape[1])], 1)
    torch.testing.assert_close(steps, whole.logits.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(dec.state.low, whole.state.low, rtol=0, atol=1e-12)


def test_the_whole_prompt_is_read():
    """Changing only the first prompt token changes what follows (the state carries it)."""
    model = tiny(torch.float32)
    prompt = ids(1, 12)
    other = prompt.clone()
    other[0, 0] = (prompt[0, 0] + 1) % 40
    cfg = GenerationConfig(max_new_tokens=5)
    a, b = generate(model, prompt, cfg), generate(model, other, cfg)
    assert a.decoder.state.tokens == 12 + 5
    assert not torch.allclose(a.decoder.last_logits, b.decoder.last_logits)
    ref = model(torch.cat([prompt, a.tokens[:, :-1]], 1)).logits[:, 11:].argmax(-1)
    assert torch.equal(ref, a.tokens)  # greedy generation = greedy over one forward pass


def test_repetition_penalty_lowers_repeated_tokens_whatever_their_sign():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = torch.tensor([[0, 1]])  # one positive and one negative logit
    before = logits.softmax(-1)
    after = apply_repetition_penalty(logits, seen, 1.5).softmax(-1)
    assert after[0, 0] < before[0, 0] and after[0, 1] < before[0, 1]
    assert all(after[0, i] > before[0, i] for i in (2, 3, 4))


def test_eos_stops_and_beams_run():
    model = tiny(torch.float32)
    prompt = ids(1, 6)
    first = generate(model, prompt, GenerationConfig(max_new_tokens=8)).tokens[0, 0].item()
    stopped = generate(model, prompt, GenerationConfig(max_new_tokens=8, eos_token_id=first))
    assert stopped.tokens[0].tolist() == [first] and stopped.finish_reason == "eos"
    beams = generate(model, prompt, GenerationConfig(max_new_tokens=6, num_beams=3))
    assert 1 <= beams.tokens.shape[1] <= 6 and beams.decoder.state.tokens == 6 + beams.tokens.shape[1]


@pytest.mark.parametrize("name, params", [("hrmlm-cpu", 3.6e6), ("hrmlm-small", 61e6), ("hrmlm-medium", 90e6),
                                          ("hrmlm-large", 211e6)])
def test_bundled_recipes_construct(name, params):
    from hiermem.configs import read_config
    from hiermem.training.cli import train_model

    options = read_config(train_model, name)
    cfg = HRMLMConfig(vocab_size=options["vocab_size"], **options["model_options"])
    with torch.device("meta"):  # build without allocating
        model = HRMLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.param_count() and abs(n - params) / params < 0.02
    assert options["carry_state"] is True


@pytest.mark.parametrize("bad, words", [
    ({"n_hidden": 0}, "positive"),
    ({"T": 0}, "positive"),
    ({"tie_embeddings": True}, "n_high_hidden == n_embd"),
    ({"dropout": 1.0}, "dropout"),
    ({"eos_token_id": 40}, "eos_token_id"),
    ({"layer_norm": "yes"}, "true or false"),
])
def test_config_validation(bad, words):
    with pytest.raises(ConfigError, match=words):
        HRMLMConfig(**{"vocab_size": 40, "n_embd": 8, "n_high_hidden": 6, **bad})


def test_tied_embeddings_share_the_matrix_and_train():
    model = tiny(n_embd=6, n_high_hidden=6, tie_embeddings=True)
    assert model.output_weight is model.embedding.weight
    x = ids(2, 9)
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _save(tmp_path, name="m", **kw):
    return save_with_byte_tokenizer(lambda v: tiny(torch.float32, vocab=v, **kw), tmp_path, name)


def test_save_load_round_trip_and_state_files(tmp_path):
    model, tok = _save(tmp_path)
    x = torch.tensor([tok.encode("to be or not")])
    for loaded in (HRMLM.from_pretrained(tmp_path / "m"), load_model(tmp_path / "m")):
        assert isinstance(loaded, HRMLM) and loaded.config == model.config
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    state = model(x).state
    state.save(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    back = HRMLMState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    assert torch.equal(back.high, state.high) and back.tokens == state.tokens
    other = tiny(torch.float32, vocab=len(tok), n_hidden=5)
    with pytest.raises(CheckpointError):  # a state of another architecture
        HRMLMState.load(tmp_path / "s.safetensors", fingerprint=other.fingerprint())


def test_corrupt_or_mismatched_checkpoints_and_tokenizers_fail_clearly(tmp_path):
    _save(tmp_path)
    bad = tmp_path / "m" / "model.safetensors"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    bad.write_bytes(good)
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "n_hidden": cfg["n_hidden"] + 1}))
    with pytest.raises(CheckpointError, match="n_hidden|shape|low"):
        load_model(tmp_path / "m")
    cfg_file.write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 2, "eos_token_id": None}))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "m" / "tokenizer" / "hiermem_tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "m")


def test_train_command_resumes_bit_exactly_and_generates(tmp_path):
    """`hiermem train hrmlm` with carried state: 6 steps at once equal 3 steps, then a resumed run
    to 6 (a constant schedule, so that both runs see the same learning rates); the result loads,
    generates and answers as a served model with a session."""
    summary = resumed_run_equals_straight_run(tmp_path, "hrmlm", "hrmlm-cpu",
                                              ["n_embd=12", "n_hidden=16", "n_high_hidden=10"], steps=6, window=16)
    assert summary["steps"] == 6 and summary["model"]["n_ctx"] == 16 and summary["train_config"]["carry_state"]
    # one validation document (fewer than the batch's 2 rows): validation streams it alone
    assert [e["step"] for e in summary["val_history"]] == [3, 6] and "val_bpb" in summary["val_history"][-1]

    model = load_model(tmp_path / "b" / "final")
    tok = model.tokenizer
    out = generate(model, torch.tensor([tok.encode("O Romeo")]), GenerationConfig(max_new_tokens=5))
    assert out.tokens.shape == (1, 5)
    memory = session_memories(model, "hrmlm", ["O Romeo", ", Romeo"])[-1]
    assert memory["tokens"] >= len(tok.encode("O Romeo")) + len(tok.encode(", Romeo")) + 4


def test_bptt_window_must_match_n_ctx(tmp_path):
    from hiermem.cli import main

    code = main(["train", "hrmlm", "--config", "hrmlm-cpu", "--set", "n_ctx=64", "--window", "32",
                 "--output-dir", str(tmp_path / "x"), "--steps", "1"])
    assert code != 0 and not (tmp_path / "x" / "final").exists()


def test_bf16_autocast_trains_with_a_float32_recurrence():
    model = tiny(torch.float32).train()
    x = ids(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, return_logits=False)
    out.loss.backward()
    assert out.state.high.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.loss, model(x, labels=x).loss, rtol=2e-2, atol=2e-2)


def test_the_seed_projects_config_keys_are_read(tmp_path):
    from hiermem.configs import read_config
    from hiermem.training.cli import train_model

    seed = tmp_path / "seed.yaml"
    seed.write_text("model:\n  n_embd: 64\n  T: 3\n  N: 2\ntokenizer:\n  model_type: unigram\n  vocab_size: 1000\n"
                    "dataset:\n  sequence_length: 64\n  batch_size: 4\ntraining:\n  learning_rate: 3.0e-4\n"
                    "  warmup_steps: 10\n  max_steps: 50\n  grad_clip: 0.5\n  lr_scheduler: linear\n"
                    "  gradient_accumulation_steps: 2\ncheckpoint:\n  save_dir: runs/seed\n  keep_last: 3\n")
    cfg = read_config(train_model, str(seed))
    assert cfg == {"model_options": {"n_embd": 64, "T": 3, "N": 2}, "tokenizer_type": "unigram", "vocab_size": 1000,
                   "window": 64, "batch_size": 4, "lr": 3e-4, "warmup": 10, "steps": 50, "clip": 0.5,
                   "schedule": "linear", "grad_accum": 2, "output_dir": "runs/seed", "keep_last": 3}
    seed.write_text("dataset:\n  num_workers: 4\n")
    with pytest.raises(ConfigError, match="dataset.num_workers"):
        read_config(train_model, str(seed))


def test_the_state_does_not_keep_the_per_token_states_alive():
    model = tiny(torch.float32)
    for batch in (1, 3):
        out = model(ids(batch, 50))
        for t in (out.state.low, out.state.high):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_the_loss_without_logits_equals_the_loss_with_them():
    """return_logits=False scores from a contiguous block of logits; same loss and token NLL."""
    model = tiny()
    x = ids(3, 9)
    labels = x.clone()
    labels[0, 4] = -100
    a = model(x, labels=labels, return_token_nll=True)
    b = model(x, labels=labels, return_token_nll=True, return_logits=False)
    assert b.logits is None and a.num_tokens == b.num_tokens
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.token_nll, a.token_nll, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.last_logits, a.logits[:, -1], rtol=0, atol=1e-12)


def test_decoding_with_two_threads_equals_one_and_follows_weight_updates(monkeypatch):
    """With 2+ threads the few-row head product runs as row blocks and the recurrence reuses its
    split weights between calls; values equal the one-thread path, and an in-place weight update
    (an optimizer step) is seen by the next call."""
    model = tiny()
    x = ids(2, 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model(x, return_logits=False).last_logits
        torch.set_num_threads(2)
        two = model(x, return_logits=False).last_logits
        torch.testing.assert_close(two, one, rtol=0, atol=1e-12)
        dec = model.decoder(batch_size=2)
        steps = torch.stack([dec.feed(x[:, i]) for i in range(x.shape[1])], 1)
        torch.testing.assert_close(steps[:, -1], one.float(), rtol=0, atol=1e-6)
        with torch.no_grad():
            model.low.weight_hh.mul_(0.5)
            model.high.weight_ih.add_(0.1)
        after = model(x, return_logits=False).last_logits
        torch.set_num_threads(1)
        torch.testing.assert_close(after, model(x, return_logits=False).last_logits, rtol=0, atol=1e-12)
        assert not torch.allclose(after, one)
    finally:
        torch.set_num_threads(threads)
