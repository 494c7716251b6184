"""Recall-task training data: passkeys and needles hidden far back in long haystacks.

A sample of ``length`` tokens is a haystack with a needle sentence (a random 5-digit pass key, or a
6-digit "special magic number" of a named place) at a random depth at least ``far`` tokens before
the end -- beyond the attention window of the last segment, so only memory can carry it -- then the
question and the answer. ``labels`` are -100 everywhere but the answer: the loss is the answer's
NLL. Haystacks are real text from the split's documents; passkey samples use the evaluation's
filler sentences for every other sample, so both kinds of haystack are seen. The question never
contains the key, and a key that occurs in its haystack is drawn again.

Sample ``i`` of seed ``s`` is a pure function of (task, length, s, i): training resumes exactly and
is reproducible; evaluation draws its samples from other seeds and the test split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from hiermem.errors import ConfigError, DataError
from hiermem.evaluation.loading import tokenize
from hiermem.evaluation.tasks import (NEEDLE, NEEDLE_QUESTION, PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE,
                                      PASSKEY_QUESTION, SUBJECTS)

TRAIN_TASKS = ("passkey", "needle", "recall")  # recall: passkey and needle samples alternate


@dataclass
class TaskBatch:
    """ids (B, T) int64 and labels (B, T): the answer tokens, -100 elsewhere."""

    ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        return TaskBatch(self.ids.to(device, non_blocking=non_blocking),
                         self.labels.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class TaskSample:
    ids: list[int]
    labels: list[int]
    key: str
    needle_at: int  # token position where the needle sentence starts


class RowLoader:
    """Endless batches of rows that are pure functions of their index (``row(i)`` -> (ids, labels));
    ``state_dict`` / ``load_state_dict`` resume exactly. Subclasses set ``tokenizer``, ``batch_size``,
    ``rank``, ``world_size``, ``index`` and name in ``identity()`` what must match on resume."""

    what = "task"

    def row(self, i: int) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def __iter__(self) -> "RowLoader":
        return self

    def __next__(self) -> TaskBatch:
        first = self.index + self.rank * self.batch_size
        rows = [self.row(first + r) for r in range(self.batch_size)]
        self.index += self.batch_size * self.world_size
        return TaskBatch(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))

    def state_dict(self) -> dict:
        return {"index": self.index, **self.identity(), "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        diff = [f"{k}: saved {state.get(k)!r}, now {now[k]!r}" for k in now if k != "index" and state.get(k) != now[k]]
        if diff:
            raise ConfigError(f"cannot resume the {self.what} position: the loader differs from the saved one ("
                              + "; ".join(diff) + ")")
        self.index = int(state["index"])


class RecallTaskLoader(RowLoader):
    """Endless batches of recall samples; ``state_dict`` / ``load_state_dict`` resume exactly.

    pool: token ids of the haystack text (e.g. :func:`hiermem.evaluation.tasks.haystack_pool`).
    far: the needle ends at least this many tokens before the question.
    """

    what = "recall-task"

    def __init__(self, tokenizer, pool: list[int], task: str, length: int, batch_size: int = 1, seed: int = 0,
                 far: int = 0, rank: int = 0, world_size: int = 1):
        if task not in TRAIN_TASKS:
            raise ConfigError(f"unknown recall task {task!r}; choose among {', '.join(TRAIN_TASKS)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"bad batch/rank setting: batch {batch_size}, rank {rank} of {world_size}")
        self.tokenizer, self.pool, self.task, self.length = tokenizer, pool, task, int(length)
        self.batch_size, self.seed, self.far, self.rank, self.world_size = batch_size, seed, far, rank, world_size
        self._parts = {name: tokenize(tokenizer, text) for name, text in (
            ("intro", PASSKEY_INTRO), ("filler", PASSKEY_FILLER), ("question", PASSKEY_QUESTION))}
        place = max(SUBJECTS, key=len)
        fixed = max(len(self._parts["intro"]) + len(tokenize(tokenizer, PASSKEY_NEEDLE.format(key="99999")))
                    + len(self._parts["question"]),
                    len(tokenize(tokenizer, NEEDLE.format(subject=place, key="999999")))
                    + len(tokenize(tokenizer, NEEDLE_QUESTION.format(subject=place))))
        overhead = fixed + len(tokenize(tokenizer, " 999999")) + 1 + far
        if self.length < overhead:
            raise ConfigError(f"recall samples of {self.length} tokens are too short: the prompt, needle, question "
                              f"and answer take {overhead - far} tokens and the needle must end {far} tokens "
                              f"before the end; use at least {overhead} tokens")
        if len(pool) < self.length:
            raise DataError(f"the haystack text has {len(pool)} tokens; {self.length}-token samples need more: "
                            "use more documents or shorter samples")
        self.index = 0  # next sample of rank 0's batch

    def sample(self, i: int) -> TaskSample:
        """Sample ``i`` (deterministic)."""
        rng = random.Random(f"{self.task}:{self.length}:{self.seed}:{i}")
        kind = self.task if self.task != "recall" else ("passkey", "needle")[i % 2]
        for _ in range(100):
            if kind == "passkey":
                key = str(rng.randint(10000, 99999))
                head, needle, question = self._parts["intro"], PASSKEY_NEEDLE.format(key=key), self._parts["question"]
                needle = tokenize(self.tokenizer, needle)
            else:
                subject, key = rng.choice(SUBJECTS), str(rng.randint(100000, 999999))
                head, needle = [], tokenize(self.tokenizer, NEEDLE.format(subject=subject, key=key))
                question = tokenize(self.tokenizer, NEEDLE_QUESTION.format(subject=subject))
            answer = tokenize(self.tokenizer, " " + key)
            n_hay = self.length - len(head) - len(needle) - len(question) - len(answer)
            if kind == "passkey" and i % 2:
                unit = self._parts["filler"]
                hay = (unit * (n_hay // len(unit) + 1))[:n_hay]
            else:
                start = rng.randrange(len(self.pool) - n_hay + 1)
                hay = list(self.pool[start:start + n_hay])
            if key in self.tokenizer.decode(hay):
                continue  # the key must appear once, in the needle
            at = rng.randrange(max(1, n_hay - self.far + 1))  # the needle ends >= far tokens before the end
            ids = head + hay[:at] + needle + hay[at:] + question + answer
            labels = [-100] * (len(ids) - len(answer)) + answer
            return TaskSample(ids, labels, key, len(head) + at)
        raise DataError(f"could not draw a key absent from the haystack for sample {i}")

    def row(self, i: int) -> tuple[list[int], list[int]]:
        sample = self.sample(i)
        return sample.ids, sample.labels

    def identity(self) -> dict:
        return {"task": self.task, "length": self.length, "seed": self.seed, "far": self.far}
