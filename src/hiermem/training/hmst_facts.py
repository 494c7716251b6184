"""The synthetic facts task as HMST training data and as a benchmark of the whole system.

- :func:`document_tokens`: a facts document tokenised piece by piece, so each stated fact's first
  token position is known exactly; the system reads these same ids.
- :class:`FactsQALoader`: stage-2 batches (``TaskBatch``: ids, labels on the answer or on every
  token) for the shared trainer, rows of one fixed length, a pure function of (seed, index):
  1. *retrieval*: the document's chunk holding the fact (chunked as the consolidator chunks it) or,
     for a never-stated fact, another chunk, then the question and its answer (" unknown" then):
     the model learns to copy from what retrieval reads back, and to say unknown otherwise;
  2. *episodic*: a stretch of the document whose fact lies more than the attention window before
     the question: only the SSM can carry it;
  3. *text*: a window of the document scored on every token (language modelling stays).
- :func:`retrieval_examples`: (question, chunks, answering chunk) hidden states for the retriever.
- :func:`answer_all`: every question of some documents answered under every setting of the four
  gates that change the answering passes (``verify`` acts after them), for critic and PPO training
  and for evaluation.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from hiermem.data.facts import FactDocument, FactsTask
from hiermem.errors import ConfigError
from hiermem.evaluation.loading import tokenize
from hiermem.models.hmst.consolidation import chunk_spans
from hiermem.models.hmst.controller import GATES
from hiermem.models.hmst.retriever import RetrievalExample
from hiermem.training.recall_task import TaskBatch

RUN_GATES = ("semantic", "episodic", "expert_bias", "early_exit")  # the gates that change the answering passes


def newline_ids(tokenizer) -> tuple[int, ...]:
    return tuple(i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\n"))


def document_tokens(tokenizer, doc: FactDocument) -> tuple[list[int], list[int]]:
    """(token ids of the document, the position of each stated fact's first token)."""
    ids, starts, last = [], [], 0
    for off in doc.fact_offsets:
        ids += tokenize(tokenizer, doc.text[last:off]) if off > last else []
        starts.append(len(ids))
        last = off
    ids += tokenize(tokenizer, doc.text[last:])
    return ids, starts


def chunk_of(spans: list[tuple[int, int]], position: int) -> int:
    """Index of the span holding ``position``."""
    return next(i for i, (a, b) in enumerate(spans) if a <= position < b)


class FactsQALoader:
    """Endless stage-2 batches of ``length``-token rows (see the module docstring); resumable."""

    def __init__(self, tokenizer, task: FactsTask, length: int, batch_size: int, chunk_tokens: int,
                 attention_window: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokenizer, self.task, self.length, self.batch_size = tokenizer, task, int(length), batch_size
        self.chunk_tokens, self.window, self.seed = chunk_tokens, attention_window, seed
        self.rank, self.world_size, self.index = rank, world_size, 0
        self.newlines = newline_ids(tokenizer)
        if self.length < 2 * attention_window:
            raise ConfigError(f"facts rows of {length} tokens are too short for an attention window of "
                              f"{attention_window}: use at least {2 * attention_window}")

    def _tokens(self, i: int):
        doc = self.task.document(i)
        ids, starts = document_tokens(self.tokenizer, doc)
        return doc, ids, starts

    def row(self, i: int) -> tuple[list[int], list[int]]:
        """Row ``i``: (ids, labels), both ``length`` long."""
        rng = random.Random(f"facts-qa:{self.seed}:{i}")
        doc, ids, starts = self._tokens(i // 3)
        kind = i % 3
        if kind == 2:  # text
            a = rng.randrange(max(1, len(ids) - self.length + 1))
            row = ids[a:a + self.length]
            return self._left_pad(row, row, ids)
        question = rng.choice(doc.questions)
        q = tokenize(self.tokenizer, "\n" + question.prompt())
        target = tokenize(self.tokenizer, question.target())
        stated = question.fact_at is not None
        fact_pos = starts[doc.fact_offsets.index(question.fact_at)] if stated else None
        if kind == 0:  # retrieval
            spans = chunk_spans(ids, self.chunk_tokens, self.newlines)
            pick = chunk_of(spans, fact_pos) if stated else rng.randrange(len(spans))
            a, b = spans[pick]
            context = ids[max(0, len(ids) - self.length):]  # the document's end comes before the answer
            row = context + ids[a:b] + q
        else:  # episodic: the fact sits more than the window before the question
            room = self.length - len(q) - len(target)
            if stated:
                gap = rng.randrange(self.window, max(self.window + 1, room - 16))
                a = max(0, fact_pos - (room - gap))
                row = ids[a:fact_pos + 16] + ids[fact_pos + 16: a + room] + q
            else:
                a = rng.randrange(max(1, len(ids) - room + 1))
                row = ids[a:a + room] + q
        row = (row + target)[-self.length:]
        labels = [-100] * (len(row) - len(target)) + target
        return self._left_pad(row, labels, ids)

    def _left_pad(self, row: list[int], labels: list[int], pad_from: list[int]):
        """Fill a short row on the left with the document's own text (unscored)."""
        missing = self.length - len(row)
        if missing > 0:
            pad = (pad_from * (missing // max(len(pad_from), 1) + 1))[:missing]
            row, labels = pad + row, [-100] * missing + labels
        return row, labels

    def __iter__(self) -> "FactsQALoader":
        return self

    def __next__(self) -> TaskBatch:
        first = self.index + self.rank * self.batch_size
        rows = [self.row(first + r) for r in range(self.batch_size)]
        self.index += self.batch_size * self.world_size
        return TaskBatch(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))

    def state_dict(self) -> dict:
        return {"index": self.index, "length": self.length, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "task_seed": self.task.seed}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        diff = [f"{k}: saved {state.get(k)!r}, now {now[k]!r}" for k in now if k != "index" and state.get(k) != now[k]]
        if diff:
            raise ConfigError("cannot resume the facts-task position: the loader differs (" + "; ".join(diff) + ")")
        self.index = int(state["index"])


@torch.no_grad()
def retrieval_examples(system, docs: list[FactDocument]) -> list[RetrievalExample]:
    """For every stated question: its probe hidden states, every chunk's hidden states (as read
    in the stream), and the chunk holding the fact."""
    out = []
    for doc in docs:
        session = system.new_session()
        ids, starts = document_tokens(system.tokenizer, doc)
        hidden = system.model(torch.tensor([ids]), return_logits=False, return_hidden=True).hidden[0]
        system.read_ids(session, torch.tensor([ids]))
        spans = chunk_spans(ids, system.config.chunk_tokens, system.newlines)
        chunks = [hidden[a:b].float() for a, b in spans]
        for question in doc.questions:
            if question.fact_at is None:
                continue
            probe = system.probe(session, question.prompt())[0]
            pos = starts[doc.fact_offsets.index(question.fact_at)]
            out.append(RetrievalExample(probe.hidden[0].float(), chunks, chunk_of(spans, pos)))
    return out


@dataclass
class QuestionRecord:
    """One question answered under every run-gate setting: features (F,), truth (None: never
    stated), answers: setting (tuple of RUN_GATES bools) -> Answer (verify closed)."""

    features: torch.Tensor
    truth: str | None
    answers: dict


def gate_settings() -> list[tuple[bool, ...]]:
    return list(itertools.product([False, True], repeat=len(RUN_GATES)))


def full_gates(setting: tuple[bool, ...], verify: bool) -> dict:
    g = dict(zip(RUN_GATES, setting))
    g["verify"] = verify
    return {name: g[name] for name in GATES}


@torch.no_grad()
def answer_all(system, docs: list[FactDocument], settings: list[tuple[bool, ...]] | None = None) -> list[QuestionRecord]:
    """Answer every question of ``docs`` under each run-gate setting (verify closed)."""
    settings = settings or gate_settings()
    records = []
    for doc in docs:
        session = system.new_session()
        ids, _ = document_tokens(system.tokenizer, doc)
        system.read_ids(session, torch.tensor([ids]))
        for question in doc.questions:
            probe = system.probe(session, question.prompt())
            answers = {s: system.answer(session, question.prompt(), full_gates(s, False), probe=probe)
                       for s in settings}
            records.append(QuestionRecord(probe[2][0], question.answer, answers))
    return records
