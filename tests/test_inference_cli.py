"""`hiermem generate`: prompt from an argument, a file or stdin; batch files; decoding options."""

import io
import json
import sys

import pytest

from hiermem.cli import main
from tiny import tiny_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("gen"))


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prompt_from_argument_file_and_stdin_agree(folder, tmp_path, capsys, monkeypatch):
    opts = ["--model", str(folder), "--max-new-tokens", "20"]
    code, streamed, err = _run(capsys, "--prompt", "A long time ago", *opts)
    assert code == 0 and len(streamed.strip()) > 0 and "finish: length" in err
    (tmp_path / "p.txt").write_text("A long time ago")
    assert _run(capsys, "--prompt-file", str(tmp_path / "p.txt"), *opts)[1] == streamed
    monkeypatch.setattr(sys, "stdin", io.StringIO("A long time ago"))
    assert _run(capsys, *opts)[1] == streamed
    assert _run(capsys, "--prompt", "A long time ago", "--no-stream", *opts)[1] == streamed
    _run(capsys, "--prompt", "A long time ago", "--output", str(tmp_path / "o.txt"), *opts)
    assert (tmp_path / "o.txt").read_text() == streamed.rstrip("\n")


def test_long_prompt_goes_through_memory(folder, capsys):
    code, _, err = _run(capsys, "--model", str(folder), "--prompt", "word " * 40, "--max-new-tokens", "30")
    assert code == 0
    assert "'segments': 14" in err and "'slots_used': 5" in err  # 200 + 30 tokens, L = 16, N = 5


def test_batch_file_plain_and_jsonl(folder, tmp_path, capsys):
    (tmp_path / "b.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "first prompt"}\n"second prompt"\n')
    outs = []
    for name in ("b.txt", "b.jsonl"):
        code, _, _ = _run(capsys, "--model", str(folder), "--batch-file", str(tmp_path / name), "--output",
                          str(tmp_path / f"{name}.out"), "--max-new-tokens", "8", "--num-beams", "2")
        assert code == 0
        outs.append([json.loads(line) for line in (tmp_path / f"{name}.out").read_text().splitlines()])
    assert outs[0] == outs[1]
    assert [r["prompt"] for r in outs[0]] == ["first prompt", "second prompt"]
    assert all(r["completion_tokens"] <= 8 and r["finish_reason"] in ("length", "eos") for r in outs[0])


def test_stop_strings_sampling_and_errors(folder, tmp_path, capsys):
    opts = ["--model", str(folder), "--prompt", "abc", "--max-new-tokens", "40", "--sample", "--seed", "1"]
    _, free, _ = _run(capsys, *opts)
    stop = free.strip()[6:8]
    _, cut, err = _run(capsys, *opts, "--stop", stop)
    assert cut.rstrip("\n") == free[:free.index(stop)] and "finish: stop" in err
    assert _run(capsys, *opts, "--prompt-file", "x")[0] == 2  # prompt and prompt file together
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    code, _, err = _run(capsys, "--model", str(folder), "--batch-file", str(tmp_path / "bad.jsonl"))
    assert code == 2 and "bad.jsonl:1" in err
    assert _run(capsys, *opts, "--top-p", "1.5")[0] == 2


@pytest.mark.slow
def test_default_model_generates_and_chats(capsys):
    from hiermem.inference.generate import GenerationConfig
    from hiermem.inference.runtime import ChatFormat, load_for_inference
    from hiermem.inference.sessions import Session

    code, out, err = _run(capsys, "--prompt", "The capital of France is", "--max-new-tokens", "6")
    assert code == 0 and out.strip() and "6 generated" in err
    model, tok = load_for_inference(None)
    fmt, session = ChatFormat(tok), Session(model)
    cfg = GenerationConfig(max_new_tokens=6)
    session.chat(tok, fmt, [{"role": "user", "content": "Hi!"}], cfg)
    second = session.chat(tok, fmt, [{"role": "user", "content": "Who are you?"}], cfg)
    delta = "<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    assert second.prompt_tokens == len(tok(delta, add_special_tokens=False)["input_ids"])
