"""The from-scratch Llama-style Transformer: sliding-window reading, decoder, persistence, config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hiermem.errors import CheckpointError, ConfigError
from hiermem.inference.generate import GenerationConfig, generate
from hiermem.models import load_model
from hiermem.models.transformer import Transformer, TransformerConfig, TransformerDecoder, TransformerState

C, S = 16, 6  # context_length, stride: later passes re-read C - S = 10 tokens


def tiny(dtype=torch.float64, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{"vocab_size": 100, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                               "num_kv_heads": 2, "context_length": C, "stride": S, **kw})
    return Transformer(cfg).to(dtype).eval()


def ids(b, t, seed=1, vocab=100):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def reference(model, x):
    """Per-token logits (B, T, V) of the sliding-window reading, by an explicit loop over windows."""
    T, out = x.shape[1], []
    with torch.no_grad():
        out.append(model.lm(x[:, :C]).logits)
        for new in range(C, T, S):
            end = min(new + S, T)
            out.append(model.lm(x[:, new - (C - S):end]).logits[:, C - S:])
    return torch.cat(out, dim=1)


def test_single_window_is_one_causal_lm_pass():
    model = tiny()
    for t in (C, 7):
        x = ids(2, t)
        out = model(x, labels=x)
        ref = model.lm(x, labels=x)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-12)
        hand = F.cross_entropy(ref.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        torch.testing.assert_close(out.loss, hand, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.loss.float(), ref.loss, rtol=1e-5, atol=1e-6)  # HF: float32 loss
        assert out.num_tokens == 2 * (t - 1)
        assert out.state.tokens == t and torch.equal(out.state.tail, x[:, -(C - S):])


def test_long_input_equals_hand_made_sliding_window():
    model = tiny()
    x = ids(2, int(3.5 * C))
    labels = x.clone()
    labels[0, 20] = -100
    ref = reference(model, x)
    ref_nll = F.cross_entropy(ref[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(2, -1)
    ref_nll = ref_nll * (labels[:, 1:] != -100)
    out = model(x, labels=labels, return_token_nll=True)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.token_nll, ref_nll, rtol=0, atol=1e-12)
    assert out.num_tokens == 2 * (x.shape[1] - 1) - 1
    torch.testing.assert_close(out.loss, ref_nll.sum() / out.num_tokens, rtol=0, atol=1e-12)
    lean = model(x, labels=labels, return_logits=False)  # no (B, T, V) logits, same loss
    assert lean.logits is None
    torch.testing.assert_close(lean.nll_sum, out.nll_sum, rtol=0, atol=1e-12)
    torch.testing.assert_close(lean.last_logits, ref[:, -1], rtol=0, atol=1e-12)
    bare = model(x, return_logits=False)  # only the last pass runs
    assert bare.loss is None and bare.token_nll is None
    torch.testing.assert_close(bare.last_logits, ref[:, -1], rtol=0, atol=1e-12)
    assert bare.state.tokens == x.shape[1] and torch.equal(bare.state.tail, x[:, -(C - S):])


@pytest.mark.parametrize("chunks", [(16, 12, 6, 22), (5, 11, 6, 34), (3, 37, 16)])
def test_chunks_on_pass_boundaries_equal_one_call(chunks):
    model = tiny()
    x = ids(2, sum(chunks))
    whole = model(x)
    state, logits, start = None, [], 0
    for n in chunks:
        out = model(x[:, start:start + n], state=state)
        state, start = out.state, start + n
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), whole.logits, rtol=0, atol=1e-12)
    assert state.tokens == whole.state.tokens and torch.equal(state.tail, whole.state.tail)


def test_decoder_token_by_token_equals_forward():
    model = tiny()
    x = ids(2, 41)  # passes restart after tokens 16, 22, 28, 34, 40
    ref = model(x).logits
    dec = model.decoder(batch_size=2)
    assert isinstance(dec, TransformerDecoder)
    steps = torch.stack([dec.feed(x[:, i]) for i in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, ref, rtol=0, atol=1e-8)
    assert dec.tokens_seen == 41 and dec.nbytes > 0
    # mixed chunk sizes, across restarts, give the same next-token logits
    dec2, at = model.decoder(batch_size=2), 0
    for n in (3, 20, 1, 17):
        got = dec2.feed(x[:, at:at + n])
        at += n
        torch.testing.assert_close(got, ref[:, at - 1], rtol=0, atol=1e-8)
    # snapshot: a decoder rebuilt from the state and fed the pending tokens is in the same condition
    state, pending = dec.snapshot()
    assert state.tokens + pending.shape[1] == 41
    back = model.decoder(state)
    torch.testing.assert_close(back.feed(pending), ref[:, -1], rtol=0, atol=1e-8)
    y = ids(2, 9, seed=5)
    torch.testing.assert_close(back.feed(y), dec.feed(y), rtol=0, atol=1e-8)


def test_decoder_continues_a_forward_state():
    model = tiny()
    x = ids(1, 40)
    first = model(x[:, :22])  # ends on a pass boundary
    dec = model.decoder(first.state, last_logits=first.last_logits)
    steps = torch.stack([dec.feed(x[:, i]) for i in range(22, 40)], dim=1)
    torch.testing.assert_close(steps, model(x).logits[:, 22:], rtol=0, atol=1e-8)


def test_select_rows_forks_without_touching_the_original():
    model = tiny()
    x, y = ids(2, 20), ids(3, 8, seed=2)
    dec = model.decoder(batch_size=2)
    dec.feed(x)
    fork = dec.select_rows(torch.tensor([1, 1, 0]))
    got = torch.stack([fork.feed(y[:, i]) for i in range(8)], dim=1)
    rows = x[[1, 1, 0]]
    torch.testing.assert_close(got, model(torch.cat([rows, y], 1)).logits[:, 20:], rtol=0, atol=1e-8)
    z = ids(2, 4, seed=3)
    torch.testing.assert_close(dec.feed(z), model(torch.cat([x, z], 1)).logits[:, -1], rtol=0, atol=1e-8)
    dec.reorder_rows(torch.tensor([1, 0]))
    assert dec.batch_size == 2 and torch.equal(dec.current[0], torch.cat([x, z], 1)[1, 22:])  # restarted after token 22


def test_generation_greedy_is_deterministic_and_beam_search_runs():
    model = tiny(torch.float32)
    prompt = ids(1, 5)
    cfg = GenerationConfig(max_new_tokens=30)  # crosses several window restarts
    a, b = generate(model, prompt, cfg), generate(model, prompt, cfg)
    assert a.tokens.shape == (1, 30) and torch.equal(a.tokens, b.tokens)
    ref = model(torch.cat([prompt, a.tokens[:, :-1]], 1)).logits[:, 4:].argmax(-1)
    assert torch.equal(ref, a.tokens)  # greedy over the decoder = greedy over forward
    beams = generate(model, prompt, GenerationConfig(max_new_tokens=12, num_beams=3))
    assert beams.tokens.shape[0] == 1 and 1 <= beams.tokens.shape[1] <= 12


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    from hiermem.tokenizers import train_tokenizer

    tok = train_tokenizer(["some text to read, and more of it. " * 50], tmp_path / "tok", type="byte")
    model = tiny(torch.float32, vocab_size=len(tok), tie_embeddings=tie, bos_token_id=2, eos_token_id=3,
                 tokenizer=str(tmp_path / "tok"))
    with torch.no_grad():  # make the two names of a tied matrix visibly trained
        model.lm.get_input_embeddings().weight.add_(0.1)
    model.tokenizer = tok
    model.save_pretrained(tmp_path / "m")
    x = torch.tensor([tok.encode("some text")])
    for loaded in (Transformer.from_pretrained(tmp_path / "m"), load_model(tmp_path / "m")):
        assert isinstance(loaded, Transformer) and loaded.config == model.config
        assert (loaded.lm.lm_head.weight is loaded.lm.get_input_embeddings().weight) == tie
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
        assert loaded.tokenizer.encode("more text") == tok.encode("more text")
        assert loaded.fingerprint() == model.fingerprint()
    # states save and load with the model's fingerprint
    state = model(x).state
    state.save(tmp_path / "state.safetensors", fingerprint=model.fingerprint())
    back = TransformerState.load(tmp_path / "state.safetensors", fingerprint=model.fingerprint())
    assert torch.equal(back.tail, state.tail) and back.tokens == state.tokens


def test_corrupt_or_missing_checkpoint_files(tmp_path):
    model = tiny(torch.float32)
    model.save_pretrained(tmp_path / "m")  # no tokenizer: loads without one
    assert Transformer.from_pretrained(tmp_path / "m").tokenizer is None
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        Transformer.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError):
        Transformer.from_pretrained(tmp_path / "nowhere")
    other = tiny(torch.float32, hidden_size=16)
    other.save_pretrained(tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    (tmp_path / "o" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(CheckpointError):
        Transformer.from_pretrained(tmp_path / "o")


@pytest.mark.parametrize("bad, words", [
    ({"hidden_size": 30}, "divisible by num_heads"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"stride": 17}, "stride"),
    ({"stride": 0}, "positive"),
    ({"num_layers": 0}, "positive"),
    ({"vocab_size": -1}, "positive"),
    ({"hidden_size": 12, "num_heads": 4}, "even"),
    ({"dropout": 1.0}, "dropout"),
    ({"eos_token_id": 100}, "eos_token_id"),
    ({"model_type": "hmt"}, "model_type"),
])
def test_config_validation(bad, words):
    base = {"vocab_size": 100, "hidden_size": 32, "num_heads": 4, "context_length": C}
    with pytest.raises(ConfigError, match=words):
        TransformerConfig(**{**base, **bad})


def test_config_defaults_and_dict_round_trip():
    cfg = TransformerConfig(vocab_size=8000)
    assert (cfg.kv_heads, cfg.ffn_size, cfg.stride_tokens, cfg.overlap) == (4, 704, 256, 256)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(stride=512).overlap == 0
    with pytest.raises(ConfigError, match="vocab_size"):
        TransformerConfig.from_dict({"hidden_size": 64})
    small = tiny(torch.float32)
    assert small.param_count() == small.config.param_count()
    assert small.lm.dtype == torch.float32


def test_disjoint_windows_when_stride_equals_context():
    model = tiny(stride=C)
    x = ids(1, 2 * C + 3)
    out = model(x)
    assert out.state.tail.shape == (1, 0)
    ref = torch.cat([model.lm(x[:, s:s + C]).logits for s in range(0, x.shape[1], C)], dim=1)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-12)
    dec = model.decoder()
    torch.testing.assert_close(torch.stack([dec.feed(x[:, i]) for i in range(x.shape[1])], 1), ref,
                               rtol=0, atol=1e-8)


def test_training_step_reaches_every_parameter():
    model = tiny(torch.float32, dropout=0.1).train()
    names = model.trainable_names()
    groups = {g["name"]: g for g in model.parameter_groups(names, 0.1)}
    emb = model.lm.get_input_embeddings().weight
    assert any(p is emb for p in groups["decay"]["params"])  # tied embedding/head matrix decays
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    for t in (C, 3 * C):  # one window, and several passes
        model.zero_grad()
        x = ids(2, t)
        out = model(x, labels=x, return_logits=False)
        out.loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
