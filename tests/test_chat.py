"""`hiermem chat`: commands, memory persisted across runs, Ctrl+C stops a reply without losing it."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hiermem.cli import main
from hiermem.inference.sessions import Session
from tiny import tiny_model_folder


def _chat(monkeypatch, capsys, lines: list[str], *args) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", *args]) == 0
    return capsys.readouterr().out


def _stats(out: str) -> list[dict]:
    rows = [line.removeprefix("> ") for line in out.splitlines() if "slots_used=" in line]
    return [{k: int(v) for k, v in (kv.split("=") for kv in row.split())} for row in rows]


@pytest.mark.parametrize("template", [True, False])
def test_memory_and_history_persist_across_runs(tmp_path, monkeypatch, capsys, template):
    folder = tiny_model_folder(tmp_path, chat_template=template)
    session = tmp_path / "chat.safetensors"
    args = ["--model", str(folder), "--session", str(session), "--max-new-tokens", "12", "--seed", "3"]
    out = _chat(monkeypatch, capsys, ["hello, who are you?", "/stats", "tell me more", "/stats"], *args)
    first, second = _stats(out)
    assert first["turns"] == 1 and second["turns"] == 2 and second["tokens"] > first["tokens"] > 0
    assert session.exists()
    out = _chat(monkeypatch, capsys, ["/stats", "and now?", "/stats"], *args)
    restored, after = _stats(out)
    assert "restored: 2 turns" in out
    assert restored["tokens"] == second["tokens"] and restored["slots_used"] == second["slots_used"]
    assert after["turns"] == 3 and after["tokens"] > restored["tokens"]


def test_commands_reset_save_and_unknown(tmp_path, monkeypatch, capsys):
    folder = tiny_model_folder(tmp_path)
    extra = tmp_path / "copy.safetensors"
    out = _chat(monkeypatch, capsys, ["hi", f"/save {extra}", "/reset", "/stats", "/bogus", "/save"],
                "--model", str(folder), "--max-new-tokens", "4")
    assert extra.exists() and "memory and history cleared" in out and "unknown command /bogus" in out
    assert "no session file" in out
    (stats,) = _stats(out)
    assert stats["tokens"] == 0 and stats["turns"] == 0


def test_ctrl_c_interrupts_a_reply_and_keeps_the_session(tmp_path):
    folder = tiny_model_folder(tmp_path)
    session = tmp_path / "s.safetensors"
    # the child gets the default SIGINT disposition whatever this run inherited (`nohup make test &`
    # starts it with SIGINT ignored, and an ignored SIGINT would never reach the child's Python)
    proc = subprocess.Popen([sys.executable, "-m", "hiermem.cli", "chat", "--model", str(folder), "--session",
                             str(session), "--max-new-tokens", "200000", "--no-sample"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("tell me a very long story\n")
        proc.stdin.flush()
        banner = proc.stdout.readline()
        assert "hiermem chat" in banner
        assert proc.stdout.read(20)  # the reply is streaming
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/stats\n/quit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "[interrupted]" in out
    (stats,) = _stats(out)
    assert stats["turns"] == 1 and stats["tokens"] > 30
    restored = Session.load(session, __import__("hiermem.inference.runtime", fromlist=["x"])
                            .load_for_inference(str(folder))[0])
    assert restored.stats()["tokens"] == stats["tokens"]
    assert restored.history[-1]["role"] == "assistant" and restored.history[-1]["content"]
    assert json.dumps(restored.history)  # plain JSON-able history
