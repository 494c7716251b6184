"""A toy model written only against the model protocol goes through every shared layer: trains,
resumes bit-exactly with carried state, evaluates (bits per byte), generates with beams, is served
with sessions. Nothing outside this file mentions it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import httpx
import pytest
import torch
from torch import nn

from hiermem.data import StreamLoader, TokenizedCorpus
from hiermem.errors import ConfigError
from hiermem.models import HiermemModel, ModelSpec, ModelState, batch_field, load_model, register_model
from hiermem.models.base import lm_output
from hiermem.training import Trainer, TrainConfig
from tiny import VOCAB, random_ids


@dataclass
class ToyConfig:
    vocab_size: int = VOCAB
    hidden: int = 16
    ponder_weight: float = 0.1
    model_type: str = "toy-gru"

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclass
class ToyState(ModelState):
    KIND: ClassVar[str] = "toy-gru-state"
    h: torch.Tensor = batch_field(1)  # (layers=1, B, H): the batch is not dim 0
    tokens: int = 0


class ToyGRU(HiermemModel):
    """Embedding -> Elman recurrence (h_t = tanh(W x_t + U h_{t-1})) -> head, with a made-up
    auxiliary loss (mean squared hidden state). The recurrence is a plain loop: oneDNN's fused RNN
    kernels round differently from call to call, which a bit-exact resume test would catch."""

    config_class = ToyConfig
    state_class = ToyState

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.inp = nn.Linear(config.hidden, config.hidden)
        self.rec = nn.Linear(config.hidden, config.hidden, bias=False)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    @property
    def aux_weights(self):
        return {"ponder": self.config.ponder_weight}

    def init_state(self, batch_size: int = 1) -> ToyState:
        w = self.head.weight
        return ToyState(h=torch.zeros(1, batch_size, self.config.hidden, dtype=w.dtype, device=w.device))

    def forward(self, input_ids, state=None, labels=None, return_logits=True, return_token_nll=False):
        state = state if state is not None else self.init_state(input_ids.shape[0])
        x, h, outs = self.inp(self.embed(input_ids)), state.h[0], []  # (B, T, H), (B, H)
        for t in range(input_ids.shape[1]):
            h = torch.tanh(x[:, t] + self.rec(h))
            outs.append(h)
        out, h = torch.stack(outs, 1), h[None]  # (B, T, H), (1, B, H)
        new = ToyState(h=h, tokens=state.tokens + input_ids.shape[1])
        return lm_output(self.head(out), input_ids, labels, new, return_logits, return_token_nll,
                         aux={"ponder": out.pow(2).mean()})


register_model(ModelSpec("toy-gru", f"{__name__}:ToyGRU", description="test-only GRU"), replace=True)


def toy(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ToyGRU(ToyConfig()).to(dtype)


def test_carried_state_equals_one_long_forward():
    model = toy(torch.float64)
    ids = random_ids(3, 50)
    whole = model(ids, return_token_nll=True)
    state, nll = None, []
    for s, e in ((0, 7), (7, 8), (8, 31), (31, 50)):
        out = model(ids[:, s:e], state=state, return_token_nll=True)
        if state is not None:  # the first token of a call is predicted by the previous call
            nll.append(torch.nn.functional.cross_entropy(prev.double(), ids[:, s], reduction="none")[:, None])
        nll.append(out.token_nll)
        state, prev = out.state, out.last_logits
    torch.testing.assert_close(torch.cat(nll, 1), whole.token_nll, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.h, whole.state.h, rtol=1e-12, atol=1e-12)
    assert state.tokens == 50


def test_state_utilities_follow_the_declared_batch_dim(tmp_path):
    model = toy()
    state = model(random_ids(3, 10)).state
    picked = state.select_rows(torch.tensor([2, 0]))
    assert picked.batch_size == 2 and torch.equal(picked.h[:, 0], state.h[:, 2])
    fresh = model.init_state(3)
    reset = state.reset_rows(torch.tensor([False, True, False]), fresh)
    assert torch.equal(reset.h[:, 1], fresh.h[:, 1]) and torch.equal(reset.h[:, 0], state.h[:, 0])
    state.save(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    again = ToyState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint())
    assert again.fingerprint() == state.fingerprint() and again.tokens == 10
    assert state.nbytes == state.h.numel() * state.h.element_size()


def corpus(n=6, length=200):
    return TokenizedCorpus.from_token_lists([random_ids(1, length, seed=i)[0].tolist() for i in range(n)])


def _trainer(model, out, steps, **kw):
    cfg = TrainConfig(steps=steps, batch_size=2, lr=5e-3, warmup=0, schedule="constant", eval_every=2, eval_batches=2,
                      save_every=2, tensorboard=False, progress=False, carry_state=True, **kw)
    return Trainer(model, cfg, StreamLoader(corpus(), 20, 2, seed=1), StreamLoader(corpus(3), 20, 2, seed=2),
                   output_dir=out)


def test_trains_with_carried_state_and_resumes_bit_exactly(tmp_path):
    a = toy()
    whole = _trainer(a, tmp_path / "a", 6)
    res = whole.fit()
    assert res.status == "completed" and "val_ponder" in res.evaluations[-1]
    b = toy()
    first = _trainer(b, tmp_path / "b", 6)
    first.cfg.steps = 3  # stop halfway (as an interruption would), then resume in a new trainer
    first.fit()
    assert first.carried is not None and first.carried.tokens > 0
    c = toy(seed=5)  # other initial weights: everything must come from the checkpoint
    second = _trainer(c, tmp_path / "b", 6)
    second.fit(resume=True)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(second.carried.h, whole.carried.h) and second.carried.tokens == whole.carried.tokens


def test_generates_with_beams_evaluates_and_serves_with_sessions(tmp_path):
    from hiermem.evaluation.perplexity import model_nll
    from hiermem.inference.generate import GenerationConfig, generate
    from hiermem.inference.server import create_app, running
    from hiermem.tokenizers import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = train_tokenizer([text], tmp_path / "tok", type="byte")
    torch.manual_seed(0)
    model = ToyGRU(ToyConfig(vocab_size=len(tok)))
    model.tokenizer = tok
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, ToyGRU) and loaded.tokenizer is not None
    ids = torch.tensor([tok(text[:60], add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    greedy = generate(loaded, ids[:, :10], GenerationConfig(max_new_tokens=6))
    again = generate(loaded, ids[:, :10], GenerationConfig(max_new_tokens=6))
    assert torch.equal(greedy.tokens, again.tokens) and greedy.tokens.shape == (1, 6)
    beams = generate(loaded, ids[:, :10], GenerationConfig(max_new_tokens=6, num_beams=3))
    assert beams.tokens.shape[1] <= 6 and beams.decoder.state.tokens == 10 + beams.tokens.shape[1]
    nll, _ = model_nll(loaded, ids[0])
    torch.testing.assert_close(nll, loaded(ids, return_token_nll=True).token_nll[0].float())
    app = create_app(loaded.eval(), tok, model_name="toy")
    with running(app) as base:
        body = {"model": "toy", "prompt": "the quick", "max_tokens": 4, "session_id": "s1"}
        r1 = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert r1.status_code == 200, r1.text
        r2 = httpx.get(f"{base}/v1/sessions/s1", timeout=30)
        assert r2.status_code == 200 and r2.json()["memory"]["tokens"] > 4


def test_yaml_recipe_unknown_key_is_named_and_command_line_wins(tmp_path):
    from hiermem.cli import main
    from hiermem.configs import read_config
    from hiermem.training.cli import train_model

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'training.stpes'"):
        read_config(train_model, str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  hidden: 8\ntraining:\n  steps: 2\n  lr: 0.5\ntokenizer:\n  type: byte\n")
    cfg = read_config(train_model, str(good))
    assert cfg == {"model_options": {"hidden": 8}, "steps": 2, "lr": 0.5, "tokenizer_type": "byte"}
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text("all the world's a stage, and all the men and women merely players. " * 30)
    out = tmp_path / "run"
    code = main(["train", "toy-gru", "--config", str(good), "--steps", "3", "--source", str(docs),
                 "--validation-fraction", "0.25", "--test-fraction", "0.0", "--window", "32", "--batch-size", "2",
                 "--output-dir", str(out), "--no-tensorboard", "--no-progress", "--set", "hidden=12"])
    assert code == 0
    import json

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3  # the command line's --steps beat the file's 2
    assert summary["model"]["hidden"] == 12 and summary["train_config"]["lr"] == 0.5
    assert load_model(out / "final").config.hidden == 12


def test_compare_trains_under_a_budget_and_reports_bits_per_byte(tmp_path):
    import json

    from hiermem.cli import main

    code = main(["compare", "--models", "transformer", "--budget-minutes", "0.05", "--documents", "1",
                 "--max-chars", "1500", "--bin-bytes", "500", "--passkey-lengths", "300", "--passkey-samples", "1",
                 "--vocab-size", "400", "--output", str(tmp_path / "cmp")])
    assert code == 0
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())["models"]["transformer"]
    assert res["training"]["status"] == "budget" and res["training"]["steps"] >= 1
    assert 0 < res["bpb"] < 20 and len(res["by_position"]) == 3
    # bits per byte over all bins equals the overall figure (bytes-weighted)
    total = sum(b["bpb"] * b["bytes"] for b in res["by_position"]) / sum(b["bytes"] for b in res["by_position"])
    assert abs(total - res["bpb"]) < 1e-9
    assert (tmp_path / "cmp" / "compare.md").read_text().count("transformer") >= 1
