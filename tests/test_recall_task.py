"""Recall-task training data: deterministic, leak-free, the needle beyond the window, answer-only labels."""

import pytest
import torch

from hiermem.errors import ConfigError
from hiermem.training.recall_task import RecallTaskLoader
from tiny import tiny_tokenizer

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.\n") * 40


def loader(task="recall", length=600, far=150, **kw):
    tok = tiny_tokenizer()
    return RecallTaskLoader(tok, tok(TEXT, add_special_tokens=False)["input_ids"], task, length, far=far, **kw), tok


@pytest.mark.parametrize("task", ["passkey", "needle", "recall"])
def test_samples_are_deterministic_leak_free_and_far(task):
    data, tok = loader(task)
    kinds = set()
    for i in range(12):
        s = data.sample(i)
        assert s == data.sample(i) and len(s.ids) == len(s.labels) == 600
        answer = [t for t, lab in zip(s.ids, s.labels) if lab != -100]
        assert s.labels[:-len(answer)] == [-100] * (600 - len(answer)) and tok.decode(answer).strip() == s.key
        prompt = tok.decode(s.ids[:-len(answer)])
        passkey = "pass key" in prompt
        assert prompt.count(s.key) == (2 if passkey else 1)  # in the needle sentence only, not in hay or question
        question = prompt[prompt.rindex(s.key) + len(s.key):]
        question = question[question.rindex("."):]  # the text after the needle's last sentence
        assert not any(c.isdigit() for c in question)
        needle_end = prompt.index(s.key) + len(s.key)
        assert len(prompt) - needle_end >= 150 - 30  # char tokenizer: tokens = characters (needle tail aside)
        kinds.add(passkey)
    assert data.sample(0).key != data.sample(1).key
    if task == "recall":
        assert kinds == {True, False}  # passkey and needle samples alternate


def test_batches_resume_exactly():
    data, _ = loader(batch_size=2)
    next(data)
    saved = data.state_dict()
    want = next(data)
    again, _ = loader(batch_size=2)
    again.load_state_dict(saved)
    got = next(again)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.labels, want.labels)
    other, _ = loader(batch_size=2, seed=1)
    with pytest.raises(ConfigError, match="seed"):
        other.load_state_dict(saved)


def test_too_short_samples_are_refused():
    with pytest.raises(ConfigError, match="too short"):
        loader(length=200, far=150)
    with pytest.raises(ConfigError, match="unknown recall task"):
        loader(task="qa")
