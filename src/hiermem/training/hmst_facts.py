"""The synthetic facts task as HMST training data and as a benchmark of the whole system.

- :func:`document_tokens`: a facts document tokenised piece by piece, so each stated fact's first
  token position is known exactly; the system reads these same ids.
- :class:`FactsQALoader`: stage-2 batches (``TaskBatch``: ids, labels on the answer or on every
  token) for the shared trainer, rows of one fixed length, a pure function of (seed, index):
  1. *retrieval* (half the rows, each packing as many units as fit): the document's chunk holding
     the fact (chunked as the consolidator chunks it) or, for a never-stated fact, another chunk
     (half the time one stating another entity's fact), then the question and its answer
     (" unknown" then): the model learns to copy from what retrieval reads back, and to say
     unknown otherwise;
  2. *episodic* (a quarter): a stretch of the document whose fact lies more than the attention
     window before the question: only the SSM can carry it;
  3. *text* (a quarter): a window of the document whose last ``TEXT_SCORED`` tokens are scored, so
     language modelling stays without drowning the answers' few tokens.
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

from hiermem.data.facts import UNKNOWN, FactDocument, FactsTask
from hiermem.errors import ConfigError
from hiermem.evaluation.loading import tokenize
from hiermem.models.hmst.consolidation import chunk_spans
from hiermem.models.hmst.controller import GATES
from hiermem.models.hmst.retriever import RetrievalExample
from hiermem.models.hmst.system import newline_ids
from hiermem.training.recall_task import RowLoader

RUN_GATES = ("semantic", "episodic", "expert_bias", "early_exit")  # the gates that change the answering passes
TEXT_SCORED = 32  # scored tokens of a plain-text row


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


class FactsQALoader(RowLoader):
    """Endless stage-2 batches of ``length``-token rows (see the module docstring); resumable."""

    what = "facts-task"

    def __init__(self, tokenizer, task: FactsTask, length: int, batch_size: int, chunk_tokens: int,
                 attention_window: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokenizer, self.task, self.length, self.batch_size = tokenizer, task, int(length), batch_size
        self.chunk_tokens, self.window, self.seed = chunk_tokens, attention_window, seed
        self.rank, self.world_size, self.index = rank, world_size, 0
        self.newlines = newline_ids(tokenizer)
        self._last = None  # (index, document, ids, fact starts) of the last document read
        if self.length < 2 * attention_window:
            raise ConfigError(f"facts rows of {length} tokens are too short for an attention window of "
                              f"{attention_window}: use at least {2 * attention_window}")

    def _tokens(self, i: int):
        """Document ``i`` with its tokens and fact positions (the last one is kept: four rows in a
        row read the same document)."""
        if self._last is None or self._last[0] != i:
            doc = self.task.document(i)
            self._last = (i, doc, *document_tokens(self.tokenizer, doc))
        return self._last[1:]

    def row(self, i: int) -> tuple[list[int], list[int]]:
        """Row ``i``: (ids, labels), both ``length`` long."""
        rng = random.Random(f"facts-qa:{self.seed}:{i}")
        doc, ids, starts = self._tokens(i // 4)
        kind = (0, 0, 1, 2)[i % 4]
        if kind == 2:  # text
            a = rng.randrange(max(1, len(ids) - self.length + 1))
            row = ids[a:a + self.length]
            scored = min(TEXT_SCORED, len(row))
            return self._left_pad(row, [-100] * (len(row) - scored) + row[len(row) - scored:], ids)
        if kind == 0:  # retrieval: as many (chunk, question, answer) units as fit, each scored on its answer
            spans = chunk_spans(ids, self.chunk_tokens, self.newlines)
            row, labels = [], []
            while True:
                q, target, fact_pos = self._question(rng, doc, starts)
                if fact_pos is not None:
                    pick = chunk_of(spans, fact_pos)
                elif starts and rng.random() < 0.5:  # another entity's fact: the answer must match the entity
                    pick = chunk_of(spans, rng.choice(starts))
                else:
                    pick = rng.randrange(len(spans))
                a, b = spans[pick]
                unit = ids[a:b] + q
                if row and len(row) + len(unit) + len(target) > self.length:
                    break
                row += unit + target
                labels += [-100] * len(unit) + target
            return self._left_pad(row[-self.length:], labels[-self.length:], ids)
        q, target, fact_pos = self._question(rng, doc, starts)
        room = self.length - len(q) - len(target)  # episodic: the fact sits more than the window before
        if fact_pos is not None:
            gap = rng.randrange(self.window, max(self.window + 1, room - 16))
            a = max(0, fact_pos - (room - gap))
            row = ids[a:a + room] + q
        else:
            a = rng.randrange(max(1, len(ids) - room + 1))
            row = ids[a:a + room] + q
        row = (row + target)[-self.length:]
        labels = [-100] * (len(row) - len(target)) + target
        return self._left_pad(row, labels, ids)

    def _question(self, rng: random.Random, doc: FactDocument, starts: list[int]):
        """A random question of ``doc``: (its tokens, its answer's tokens, the fact's first token or None)."""
        question = rng.choice(doc.questions)
        q = tokenize(self.tokenizer, "\n" + question.prompt())
        target = tokenize(self.tokenizer, question.target())
        fact = starts[doc.fact_offsets.index(question.fact_at)] if question.fact_at is not None else None
        return q, target, fact

    def _left_pad(self, row: list[int], labels: list[int], pad_from: list[int]):
        """Fill a short row on the left with the document's own text (unscored)."""
        missing = self.length - len(row)
        if missing > 0:
            pad = (pad_from * (missing // max(len(pad_from), 1) + 1))[:missing]
            row, labels = pad + row, [-100] * missing + labels
        return row, labels

    def identity(self) -> dict:
        return {"length": self.length, "seed": self.seed, "task_seed": self.task.seed}


@torch.no_grad()
def row_accuracy(model, loader: FactsQALoader, rows: int = 64, start: int = 0) -> dict:
    """Teacher-forced exact-match accuracy of the answers in ``rows`` loader rows (text rows
    skipped; each run of scored tokens is one answer), by kind ("retrieval", "episodic") and by
    whether the fact was stated."""
    hits: dict[str, list[int]] = {}
    for i in range(start, start + rows):
        kind = ("retrieval", "retrieval", "episodic", None)[i % 4]
        if kind is None:
            continue
        ids, labels = loader.row(i)
        pred = model(torch.tensor([ids]), return_logits=True).logits[0].argmax(-1).tolist()  # pred[t] guesses t + 1
        t = 1
        while t < len(labels):
            if labels[t] == -100:
                t += 1
                continue
            end = t
            while end < len(labels) and labels[end] != -100:
                end += 1
            ok = all(pred[j - 1] == labels[j] for j in range(t, end))
            unknown = loader.tokenizer.decode(labels[t:end]).strip() == UNKNOWN
            for key in (kind, f"{kind}_{'unstated' if unknown else 'stated'}"):
                hits.setdefault(key, []).append(int(ok))
            t = end
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


@torch.no_grad()
def retrieval_examples(system, docs: list[FactDocument]) -> list[RetrievalExample]:
    """For every stated question: its probe hidden states, every chunk's hidden states (as read
    in the stream), and the chunk holding the fact."""
    out = []
    for doc in docs:
        session = system.new_session()
        ids, starts = document_tokens(system.tokenizer, doc)
        hidden = system.read_ids(session, torch.tensor([ids]))  # (T, d)
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
def answer_all(system, docs: list[FactDocument],
               settings: list[tuple[bool, ...]] | None = None) -> list[QuestionRecord]:
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
