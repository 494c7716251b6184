"""Online learning in chat (Hierarchos): the per-turn step size in the state drives the memory's
update, the cosine schedule's values, the LTM changes across chat turns, --ltm-state restores it
exactly after a restart and refuses another model, /bad weakens exactly the slots the last answer
read, options fail clearly for other families, and two server sessions never share memory."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch

from hiermem.cli import main
from hiermem.errors import ConfigError
from hiermem.inference.generate import GenerationConfig
from hiermem.inference.online import KIND, LtmSchedule, OnlineLearning, online_learning
from hiermem.inference.runtime import ChatFormat
from hiermem.inference.sessions import Session
from hiermem.io import load_tensors
from hiermem.models.hierarchos import Hierarchos, HierarchosConfig
from scratch_family import save_with_byte_tokenizer
from tiny import tiny_model_folder

SMALL = dict(context_dim=8, persistent_dim=4, ltm_slots=12, ltm_key_dim=6, ltm_val_dim=5, ltm_topk=3, h_hidden=7,
             l_hidden=9, h_stride=3, max_h_steps=3, max_l_steps=2, ltm_lr=0.5, ltm_forget=0.01, bos_token_id=None,
             eos_token_id=None)


def make(vocab: int, seed: int = 0) -> Hierarchos:
    torch.manual_seed(seed)
    model = Hierarchos(HierarchosConfig(vocab_size=vocab, **SMALL))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model, tok = save_with_byte_tokenizer(make, tmp_path)
    return model, tok, tmp_path / "m"


def chat(monkeypatch, capsys, lines, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def stats(out: str) -> list[dict]:
    rows = [line.removeprefix("> ") for line in out.splitlines() if "ltm_fast_norm=" in line]
    return [dict(kv.split("=", 1) for kv in row.split()) for row in rows]


def test_schedule_values():
    s = LtmSchedule(0.01, min_lr=1e-4, steps=4)
    expected = [1e-4 + (0.01 - 1e-4) * 0.5 * (1 + math.cos(math.pi * n / 4)) for n in range(4)]
    assert [s.lr_at(n) for n in range(8)] == pytest.approx(expected * 2)  # restarts every 4 turns
    assert s.lr_at(0) == pytest.approx(0.01) and s.lr_at(2) == pytest.approx((0.01 + 1e-4) / 2)
    assert LtmSchedule(0.01, steps=4, static=True).lr_at(3) == 0.01
    assert LtmSchedule(0.0).lr_at(5) == 0.0  # min_lr is capped at lr: 0 means no learning
    for bad in (dict(lr=-1.0), dict(lr=0.1, min_lr=-1.0), dict(lr=0.1, steps=0)):
        with pytest.raises(ConfigError):
            LtmSchedule(**bad)


def test_step_size_in_the_state_drives_the_update():
    model = make(40)
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    start = model(x[:, :4]).state
    per_row = model.with_ltm_lr(start, 0.0)
    per_row.ltm_lr = torch.tensor([0.0, 0.2])
    out = model(x[:, 4:], state=per_row)
    frozen = model(x[:, 4:], state=model.with_ltm_lr(start, 0.0)).state
    decayed, _ = model.ltm_contents(type(start)(**{**vars(start), "clock": frozen.clock}))
    torch.testing.assert_close(model.ltm_contents(frozen)[0], decayed, rtol=1e-6, atol=1e-7)  # lr 0: decay alone
    other = make(40)
    other.config.ltm_lr = 0.2  # a run-time field: the same step size from the config
    ref = other(x[1:, 4:], state=start.select_rows(torch.tensor([1]))).state
    torch.testing.assert_close(out.state.ltm_fast[1:], ref.ltm_fast, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.state.ltm_fast[:1], frozen.ltm_fast[:1], rtol=0, atol=1e-6)
    assert not torch.allclose(out.state.ltm_fast[1:], frozen.ltm_fast[1:])
    assert out.state.ltm_steps == 0 and model.with_ltm_lr(start, 0.1, steps=3).ltm_steps == 3


def test_chat_learns_each_turn_and_ltm_state_restores_it_exactly(saved, tmp_path, monkeypatch, capsys):
    model, _, folder = saved
    ltm = tmp_path / "ltm.safetensors"
    args = ["--model", str(folder), "--ltm-state", str(ltm), "--max-new-tokens", "6", "--no-sample",
            "--ltm-schedule-steps", "3", "--ltm-schedule-min-lr", "0.01"]
    code, out, _ = chat(monkeypatch, capsys, ["/stats", "to be or not", "/stats", "that is the question", "/stats"],
                        *args)
    assert code == 0
    fresh, one, two = stats(out)
    assert [int(s["ltm_steps"]) for s in (fresh, one, two)] == [0, 1, 2]
    schedule = LtmSchedule(0.5, 0.01, 3)  # the model's ltm_lr is the schedule's maximum
    assert [float(s["next_ltm_lr"]) for s in (fresh, one, two)] == pytest.approx(
        [schedule.lr_at(n) for n in range(3)], rel=1e-5)
    assert float(fresh["ltm_fast_norm"]) == 0 < float(one["ltm_fast_norm"]) != float(two["ltm_fast_norm"])
    saved_tensors, meta = load_tensors(ltm)
    assert meta["kind"] == KIND and meta["ltm_steps"] == 2 and set(saved_tensors) == set(Hierarchos.LTM_FIELDS)
    # restart: the learnt memory comes back bit for bit (and is written back unchanged)
    code, out, _ = chat(monkeypatch, capsys, ["/stats"], *args)
    assert code == 0 and "restored: 2 turns learnt" in out
    (restored,) = stats(out)
    assert restored["ltm_fast_norm"] == two["ltm_fast_norm"] and restored["clock"] == two["clock"]
    again, _ = load_tensors(ltm)
    assert all(torch.equal(saved_tensors[k], again[k]) for k in saved_tensors)
    session = Session(model)
    online_learning(model).load_ltm(session, ltm)
    state = session.decoder.state
    assert all(torch.equal(getattr(state, k), saved_tensors[k]) for k in Hierarchos.LTM_FIELDS)
    assert state.ltm_steps == 2 and torch.equal(state.manager, model.init_state(1).manager)  # short-term: fresh


def test_ltm_state_refuses_another_model_and_other_families(saved, tmp_path, monkeypatch, capsys):
    _, _, folder = saved
    ltm = tmp_path / "ltm.safetensors"
    assert chat(monkeypatch, capsys, ["hi"], "--model", str(folder), "--ltm-state", str(ltm),
                "--max-new-tokens", "2")[0] == 0
    save_with_byte_tokenizer(lambda v: make(v, seed=7), tmp_path, "other")  # same shapes, other weights
    code, _, err = chat(monkeypatch, capsys, ["hi"], "--model", str(tmp_path / "other"), "--ltm-state", str(ltm))
    assert code == 2 and "learnt by another model" in err
    code, _, err = chat(monkeypatch, capsys, [], "--model", str(folder), "--ltm-state", str(ltm),
                        "--session", str(tmp_path / "s.safetensors"))
    assert code == 2 and "not both" in err
    hmt = tiny_model_folder(tmp_path / "hmt")
    for extra in (["--ltm-state", str(tmp_path / "x.safetensors")], ["--static-ltm-lr"], ["--ltm-lr", "0.1"]):
        code, _, err = chat(monkeypatch, capsys, [], "--model", str(hmt), *extra)
        assert code == 2 and "learns at run time" in err, extra
    code, out, _ = chat(monkeypatch, capsys, ["hello", "/bad"], "--model", str(hmt), "--max-new-tokens", "2")
    assert code == 0 and "/bad needs a model whose memory learns" in out


def test_bad_weakens_exactly_the_slots_the_last_answer_read(saved, monkeypatch, capsys, tmp_path):
    model, tok, folder = saved
    learning = OnlineLearning(model, LtmSchedule(0.5, static=True), bad_scale=0.25)
    session = Session(model)
    session.learning = learning
    with pytest.raises(ConfigError, match="no answer"):
        learning.bad(session)
    cfg = GenerationConfig(max_new_tokens=5, eos_token_id=[])
    session.chat(tok, ChatFormat(tok), [{"role": "user", "content": "wherefore art thou"}], cfg)
    before = session.decoder.state
    since = int(before.clock[0]) - 5 - 1  # the read that chose the answer's first token onward
    assert session.answer_from == since
    n = learning.bad(session)
    after = session.decoder.state
    hit = before.ltm_time[0] >= since
    assert n == int(hit.sum()) > 0 and not bool(hit.all())
    torch.testing.assert_close(after.ltm_fast[0][hit], 0.25 * before.ltm_fast[0][hit], rtol=0, atol=0)
    assert torch.equal(after.ltm_fast[0][~hit], before.ltm_fast[0][~hit]) and bool((after.ltm_mom[0][hit] == 0).all())
    assert torch.equal(after.ltm_mom[0][~hit], before.ltm_mom[0][~hit])
    with pytest.raises(ConfigError, match="no answer"):  # once per answer
        learning.bad(session)
    code, out, _ = chat(monkeypatch, capsys, ["to be", "/bad", "/bad"], "--model", str(folder), "--no-sample",
                        "--max-new-tokens", "4", "--bad-scale", "0.5")
    assert code == 0 and "weakened" in out and "kept 0.5" in out and "no answer to mark as bad" in out


def test_two_server_sessions_never_see_each_others_memory(saved):
    import httpx

    from hiermem.inference.server import create_app, running

    model, tok, _ = saved

    def serve(requests):
        app = create_app(model, tok, model_name="h")
        app.state.hiermem.store.learning = online_learning(model, ltm_schedule_steps=2)
        seen = []
        with running(app) as base:
            for sid, prompt in requests:
                body = {"model": "h", "prompt": prompt, "max_tokens": 4, "temperature": 0, "session_id": sid}
                r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
                assert r.status_code == 200, r.text
                seen.append({s: httpx.get(f"{base}/v1/sessions/{s}", timeout=30).json().get("memory")
                             for s in ("a", "b")})
        return seen

    mixed = serve([("a", "the secret word is lark"), ("b", "O Romeo"), ("a", "the secret word is"),
                   ("b", "wherefore art thou")])
    b_alone = serve([("b", "O Romeo"), ("b", "wherefore art thou")])
    a_alone = serve([("a", "the secret word is lark"), ("a", "the secret word is")])
    assert mixed[1]["b"] == b_alone[0]["b"] and mixed[3]["b"] == b_alone[1]["b"]  # memory and learning state
    assert mixed[2]["a"] == a_alone[1]["a"] and mixed[1]["a"] == mixed[0]["a"]  # b's requests leave a untouched
    assert mixed[3]["a"]["ltm_steps"] == mixed[3]["b"]["ltm_steps"] == 2
    assert mixed[3]["a"]["ltm_fast_norm"] != mixed[3]["b"]["ltm_fast_norm"]
