"""What `hiermem train` tells a user whose run has no validation or a warm-up longer than the run."""

import logging

import pytest

from hiermem.cli import main
from tiny import tiny_model_folder

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n"


@pytest.fixture()
def assets(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERMEM_CACHE", str(tmp_path / "cache"))
    tiny_model_folder(tmp_path)  # tmp_path/backbone: a tiny Llama with a character tokenizer
    (tmp_path / "my_docs").mkdir()
    for name in ("act1.txt", "act3.txt"):  # both in the train split by the hash of their id
        (tmp_path / "my_docs" / name).write_text(TEXT * 10)
    return tmp_path


def test_hmt_run_without_validation_and_with_a_long_warmup(assets, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code = main(["train", "hmt", "--backbone", str(assets / "backbone"), "--source", str(assets / "my_docs"),
                     "--output-dir", str(assets / "run"), "--steps", "2", "--warmup", "10", "--segment-length", "16",
                     "--sensory-length", "4", "--cache-size", "4", "--stage2-segments", "3", "--no-progress",
                     "--no-tensorboard", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "best validation perplexity None" not in out and out.count("no validation ran") == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("warm-up (10 steps) is longer than the run (2 steps)" in w for w in warnings)
    no_val = [w for w in warnings if "training without validation" in w]
    assert no_val and "split='all'" not in no_val[0] and "--validation-fraction" in no_val[0]
