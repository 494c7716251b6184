"""Recall tasks that need memory: passkey retrieval and needle-in-a-haystack over real text.

Every sample is generated deterministically from a seed and has exactly ``length`` tokens, ending
right before the answer. A method answers greedily; a sample is correct when the first number in
its answer is the hidden one. Accuracy is reported by input length and by needle depth (where in
the input the needle starts, 0 = beginning, 1 = end).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from hiermem.errors import ConfigError, DataError
from hiermem.evaluation.loading import tokenize

log = logging.getLogger(__name__)

TASKS = ("passkey", "needle")
DEPTH_BINS = 5

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NEEDLE = " The special magic number for {subject} is {key}."
NEEDLE_QUESTION = "\nWhat is the special magic number for {subject}? The special magic number for {subject} is"
SUBJECTS = ("Verona", "Elsinore", "Arden", "Illyria", "Messina", "Padua", "Cyprus", "Navarre", "Athens",
            "Rome", "Milan", "Ephesus", "Windsor", "Bohemia", "Sicilia", "Mantua", "Tyre", "Troy")


@dataclass(frozen=True)
class RecallSample:
    """One prompt of ``length`` tokens hiding ``answer`` at token ``needle_at`` (depth = fraction)."""

    task: str
    length: int
    depth: float
    answer: str
    needle_at: int
    ids: tuple[int, ...]


def _check_lengths(lengths: Sequence[int], samples: int, overhead: int) -> None:
    if samples < 1:
        raise ConfigError(f"samples per length must be >= 1, got {samples}")
    too_short = [n for n in lengths if n < overhead + 16]
    if not lengths or too_short:
        raise ConfigError(f"recall lengths must be at least {overhead + 16} tokens (prompt, needle and question "
                          f"take {overhead}); got {list(lengths)}")


def _insert(filler: list[int], at: int, needle: list[int]) -> list[int]:
    return filler[:at] + needle + filler[at:]


def passkey_samples(tokenizer, lengths: Sequence[int] = (1024, 4096), samples: int = 4,
                    seed: int = 0) -> list[RecallSample]:
    """Passkey retrieval: a random 5-digit key at a random depth of repeated filler sentences."""
    rng = random.Random(f"passkey:{seed}")
    intro, unit, question = (tokenize(tokenizer, t) for t in (PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_QUESTION))
    longest_needle = len(tokenize(tokenizer, PASSKEY_NEEDLE.format(key="99999")))
    _check_lengths(lengths, samples, len(intro) + longest_needle + len(question))
    out = []
    for length in lengths:
        for _ in range(samples):
            key, depth = str(rng.randint(10000, 99999)), rng.random()
            needle = tokenize(tokenizer, PASSKEY_NEEDLE.format(key=key))
            n_fill = length - len(intro) - len(needle) - len(question)
            filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
            at = min(round(depth * n_fill / len(unit)) * len(unit), n_fill)  # at a sentence-group boundary
            ids = intro + _insert(filler, at, needle) + question
            out.append(RecallSample("passkey", length, depth, key, len(intro) + at, tuple(ids)))
    return out


def haystack_pool(tokenizer, documents: Sequence[torch.Tensor]) -> list[int]:
    """Token ids of real documents (B_i token tensors) joined by blank lines: the haystack text."""
    sep = tokenize(tokenizer, "\n\n")
    pool: list[int] = []
    for ids in documents:
        pool += ids.tolist() + sep
    return pool


def _line_start(tokenizer, ids: list[int], at: int, search: int = 64) -> int:
    """The position nearest ``at`` (within ``search``) that follows a newline, else ``at``."""
    for off in range(search):
        for j in (at + off, at - off):
            if 0 < j <= len(ids) and tokenizer.decode([ids[j - 1]]).endswith("\n"):
                return j
    return at


def needle_samples(tokenizer, pool: Sequence[int], lengths: Sequence[int] = (1024, 4096), samples: int = 4,
                   seed: int = 0) -> list[RecallSample]:
    """Needle in a haystack: a sentence with a random 6-digit number hidden in real text at a random depth."""
    rng = random.Random(f"needle:{seed}")
    longest = max(SUBJECTS, key=len)
    overhead = (len(tokenize(tokenizer, NEEDLE.format(subject=longest, key="999999")))
                + len(tokenize(tokenizer, NEEDLE_QUESTION.format(subject=longest))))
    _check_lengths(lengths, samples, overhead)
    out = []
    for length in lengths:
        for _ in range(samples):
            subject, key, depth = rng.choice(SUBJECTS), str(rng.randint(100000, 999999)), rng.random()
            needle = tokenize(tokenizer, NEEDLE.format(subject=subject, key=key))
            question = tokenize(tokenizer, NEEDLE_QUESTION.format(subject=subject))
            n_hay = length - len(needle) - len(question)
            if len(pool) < n_hay:
                raise DataError(f"the haystack text has {len(pool)} tokens; a {length}-token needle sample "
                                "needs more: use more documents or shorter lengths")
            start = rng.randrange(len(pool) - n_hay + 1)
            hay = list(pool[start:start + n_hay])
            at = _line_start(tokenizer, hay, round(depth * n_hay))
            ids = _insert(hay, at, needle) + question
            out.append(RecallSample("needle", length, at / n_hay, key, at, tuple(ids)))
    return out


def extract_answer(text: str) -> str | None:
    """The first run of digits in ``text`` (None when there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def depth_bin(depth: float, bins: int = DEPTH_BINS) -> str:
    j = min(int(depth * bins), bins - 1)
    return f"{j / bins:.1f}-{(j + 1) / bins:.1f}"


Answerer = Callable[[torch.Tensor, int], list[int]]  # (prompt ids (T,), max new tokens) -> answer ids


def run_recall(samples: Sequence[RecallSample], answerers: dict[str, Answerer], tokenizer) -> dict:
    """Ask every method every sample; records and accuracy by task, method, length and depth."""
    records = []
    for i, s in enumerate(samples):
        budget = len(tokenize(tokenizer, " " + s.answer)) + 2
        for method, answer in answerers.items():
            text = tokenizer.decode(answer(torch.tensor(s.ids, dtype=torch.long), budget))
            correct = extract_answer(text) == s.answer
            records.append({**{k: v for k, v in asdict(s).items() if k != "ids"}, "method": method,
                            "output": text, "correct": correct})
        log.info("recall %d/%d %s length %d depth %.2f: %s", i + 1, len(samples), s.task, s.length, s.depth,
                 ", ".join(f"{r['method']} {'ok' if r['correct'] else 'miss'}" for r in records[-len(answerers):]))
    return {"summary": summarize(records), "records": records}


def _accuracy(rows: list[dict]) -> dict:
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "samples": len(rows)}


def summarize(records: list[dict]) -> dict:
    """task -> method -> {accuracy, samples, by_length: {n: ...}, by_depth: {bin: ...}}."""
    out: dict = {}
    for task in dict.fromkeys(r["task"] for r in records):
        for method in dict.fromkeys(r["method"] for r in records):
            rows = [r for r in records if r["task"] == task and r["method"] == method]
            if not rows:
                continue
            lengths = sorted({r["length"] for r in rows})
            by_length = {n: _accuracy([r for r in rows if r["length"] == n]) for n in lengths}
            bins = sorted({depth_bin(r["depth"]) for r in rows})
            by_depth = {b: _accuracy([r for r in rows if depth_bin(r["depth"]) == b]) for b in bins}
            out.setdefault(task, {})[method] = {**_accuracy(rows), "by_length": by_length, "by_depth": by_depth}
    return out
