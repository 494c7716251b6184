"""Arguments are checked before anything loads, each mistake answered by one line; batch files
honour their per-line fields; library generation stops at EOS like the command line."""

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from hiermem.cli import main
from tiny import random_ids, tiny_hmt, tiny_model_folder

NOWHERE = "/nonexistent/model"  # never read: the argument errors come first


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("valid"))


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_generate_numbers_are_checked_before_loading(capsys):
    code, _, err = _run(capsys, "generate", "--model", NOWHERE, "--prompt", "Hi", "--max-new-tokens", "-3")
    assert code == 2
    _one_line_error(err, "max_new_tokens must be >= 1, got -3")
    code, _, err = _run(capsys, "eval", "--checkpoint", NOWHERE, "--max-tokens", "-5", "--output", "")
    assert code == 2
    _one_line_error(err, "--max-tokens must be at least 2, got -5")


def test_prompt_file_that_is_binary_or_a_folder(tmp_path, capsys):
    (tmp_path / "bin.dat").write_bytes(b"GIF89a\x00\x01\x02")
    code, _, err = _run(capsys, "generate", "--model", NOWHERE, "--prompt-file", str(tmp_path / "bin.dat"))
    assert code == 2
    _one_line_error(err, "binary file (NUL byte at offset 6)")
    (tmp_path / "docs").mkdir()
    code, _, err = _run(capsys, "generate", "--model", NOWHERE, "--prompt-file", str(tmp_path / "docs"))
    assert code == 2
    _one_line_error(err, "is a folder")
    code, _, err = _run(capsys, "generate", "--model", NOWHERE, "--batch-file", str(tmp_path / "docs"))
    assert code == 2
    _one_line_error(err, "is a folder")


def test_batch_lines_set_their_own_options_and_keep_their_id(folder, tmp_path, capsys):
    lines = [{"prompt": "one", "id": "a-1", "max_new_tokens": 3, "stop": []},
             {"prompt": "two", "id": 7, "max_new_tokens": 9},
             {"prompt": "three"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _, err = _run(capsys, "generate", "--model", str(folder), "--batch-file", str(tmp_path / "b.jsonl"),
                        "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "5", "--ignore-eos")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a-1", 7, None] and "id" not in rows[2]
    assert [r["completion_tokens"] for r in rows] == [3, 9, 5]


@pytest.mark.parametrize("line, fragment", [
    ({"prompt": "x", "max_tokens": 5}, "unknown field(s) 'max_tokens'"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature' must be float"),
    ({"prompt": "x", "top_p": 2.0}, "b.jsonl:1: top_p must be in (0, 1]"),
])
def test_batch_line_mistakes_name_the_line_and_field(tmp_path, capsys, line, fragment):
    (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n")
    code, _, err = _run(capsys, "generate", "--model", NOWHERE, "--batch-file", str(tmp_path / "b.jsonl"))
    assert code == 2
    _one_line_error(err, fragment)


def test_library_generate_stops_at_the_models_eos_by_default():
    from hiermem.inference.generate import GenerationConfig, generate

    model = tiny_hmt("llama")
    head = torch.nn.Linear(32, 128)  # a head whose most likely token is always EOS (id 2)
    with torch.no_grad():
        head.weight.zero_(), head.bias.zero_(), head.bias[2].fill_(5.0)
    model.backbone.lm_head = head
    out = generate(model, random_ids(1, 5), GenerationConfig(max_new_tokens=10))
    assert out.tokens.tolist() == [[2]] and out.finish_reason == "eos"
    never = generate(model, random_ids(1, 5), GenerationConfig(max_new_tokens=10, eos_token_id=[]))
    assert never.tokens.tolist() == [[2] * 10] and never.finish_reason == "length"


def test_serve_on_a_busy_port_says_so_before_loading(folder):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "hiermem", "serve", "--model", NOWHERE, "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and time.monotonic() - start < 60
    _one_line_error(res.stderr, f"port {port}", "in use", "--port")
