"""What the tests of every from-scratch family share: a saved model with a byte tokenizer, a folder
of small plays, the `hiermem train` run interrupted and resumed against an uninterrupted one, and a
served session fed several prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_with_byte_tokenizer(make_model, root: Path, name: str = "m"):
    """``make_model(vocab_size)`` given a byte tokenizer's size, saved with it to ``root/name``;
    returns (model, tokenizer)."""
    from hiermem.tokenizers import train_tokenizer

    tok = train_tokenizer(["to be or not to be, that is the question. " * 40], root / "tok", type="byte")
    model = make_model(len(tok))
    model.tokenizer = tok
    model.save_pretrained(root / name)
    return model, tok


def play_folder(root: Path, repeats: int = 40) -> Path:
    """Six small text documents under ``root/docs``."""
    docs = root / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"play{i}.txt").write_text(f"Act {i}. " + "O Romeo, Romeo, wherefore art thou Romeo? " * repeats)
    return docs


def resumed_run_equals_straight_run(root: Path, model_type: str, config: str, sets: list[str], steps: int,
                                    window: int, repeats: int = 40) -> dict:
    """`hiermem train MODEL` with carried state for ``steps`` steps at once (root/a) and for half of
    them, then resumed to ``steps`` (root/b), with a constant schedule so both see the same learning
    rates; asserts equal final weights and returns run b's train_summary.json."""
    from hiermem.cli import main
    from hiermem.io import load_tensors
    from hiermem.models.base import WEIGHTS_NAME

    docs = play_folder(root, repeats)
    every = str(steps // 2)

    def train(out: Path, n: int) -> int:
        return main(["train", model_type, "--config", config, "--source", str(docs), "--steps", str(n),
                     "--set", *sets, "--tokenizer-type", "byte", "--window", str(window), "--batch-size", "2",
                     "--schedule", "constant", "--validation-fraction", "0.2", "--test-fraction", "0",
                     "--eval-every", every, "--eval-batches", "1", "--save-every", every, "--output-dir", str(out),
                     "--no-tensorboard", "--no-progress"])

    assert train(root / "a", steps) == 0
    assert train(root / "b", steps // 2) == 0 and train(root / "b", steps) == 0
    a, _ = load_tensors(root / "a" / "final" / WEIGHTS_NAME)
    b, _ = load_tensors(root / "b" / "final" / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return json.loads((root / "b" / "train_summary.json").read_text())


def session_memories(model, name: str, prompts: list[str]) -> list[dict]:
    """Serve ``model`` on loopback and send ``prompts`` to one session (4 new tokens each); the
    session's memory stats after each."""
    import httpx

    from hiermem.inference.server import create_app, running

    memories = []
    app = create_app(model.eval(), model.tokenizer, model_name=name)
    with running(app) as base:
        for prompt in prompts:
            body = {"model": name, "prompt": prompt, "max_tokens": 4, "session_id": "s1"}
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            memories.append(httpx.get(f"{base}/v1/sessions/s1", timeout=30).json()["memory"])
    return memories
