"""Every subcommand's --help: one default per option, defaults as typed, shared wording for shared options."""

import inspect
import re

import pytest

from hiermem.cli import COMMANDS, SHARED_HELP, main


def _commands() -> list[list[str]]:
    from hiermem.models import REGISTRY

    plain = [[c] for c in COMMANDS if c not in ("train", "tokenizer")]
    return plain + [["train", m] for m in sorted(REGISTRY)] + [["tokenizer", "train"]]


def _help(capsys, words: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare on one line


@pytest.mark.parametrize("words", _commands(), ids=" ".join)
def test_help_shows_each_default_once_and_as_typed(words, capsys):
    text = _help(capsys, words)
    # one option's help runs from its flag to the next one; none may tell its default twice
    for option in re.split(r" (?=--[a-z])", text):
        assert option.count("(default") <= 1, option
    assert "(default: None)" not in text and "(default: ())" not in text and "(default: [])" not in text
    assert not re.search(r"\(default: [\[(]", text), "lists and tuples are shown as typed: 1024 4096"


@pytest.mark.parametrize("words", [w for w in _commands() if w[0] in ("demo", "eval", "generate", "chat",
                                                                        "serve", "compare", "train")], ids=" ".join)
def test_device_and_dtype_read_the_same_everywhere(words, capsys):
    text = _help(capsys, words)
    for name, wording in SHARED_HELP.items():
        if f"--{name} " in text:
            assert " ".join(wording.split()) in text


def test_eval_lists_are_shown_as_typed(capsys):
    assert "(default: 1024 4096)" in _help(capsys, ["eval"])


def test_train_hmt_help_tells_the_real_stage2_unroll(capsys):
    from hiermem.training.cli import train

    default = inspect.signature(train).parameters["stage2_segments"].default
    text = _help(capsys, ["train", "hmt"])
    assert f"stage 2 unrolls {default} segments" in text
    assert re.findall(r"stage 2 unrolls (\d+) segments", text) == [str(default)]


def test_underscore_spellings_of_options_are_accepted(tmp_path, capsys):
    # the seed projects spell options with underscores (--lora_r, --vocab_size): both spellings parse
    from hiermem.cli import main

    common = ["tokenizer", "train", "--type", "byte", "--max-documents", "2"]
    assert main([*common, "--output", str(tmp_path / "a"), "--text_column=text"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--text-column", "text"]) == 0
    a, b = ((tmp_path / d / "hiermem_tokenizer.json").read_text() for d in "ab")
    assert a == b
    with pytest.raises(SystemExit):
        main([*common, "--output", str(tmp_path / "c"), "--no_such_option", "1"])
    assert "--no-such-option" in capsys.readouterr().err
