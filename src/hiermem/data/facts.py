"""A synthetic world of facts: invented entities' facts stated once, early, in long real text.

A document is a slice of real filler text (a corpus split) with a few fact sentences such as
``Zorvak's pet is parrot.`` inserted, each on its own line, at line boundaries within the first
``facts_before`` fraction of the text; then questions about every stated fact and about entities
never stated (whose answer is :data:`UNKNOWN`). Documents are far longer than an attention window,
so only memory can carry a fact to its question, and a critic should flag answers about entities
that were never stated. Entity names are invented from syllables and values are drawn afresh for
each document, so no fact can be memorised in the weights.

Document ``index`` of seed ``s`` is a pure function of (filler, s, index). Splits use different
seeds (:data:`SPLIT_SEEDS`) and filler from the matching corpus split::

    task = FactsTask.for_split("validation", doc_chars=20_000)
    doc = task.document(0)
    for q in doc.questions:
        sample = qa_sample(tokenizer, doc.text, q)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hiermem.data.sources import load_documents
from hiermem.errors import ConfigError, DataError

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "city": ("Paris", "London", "Tokyo", "Cairo", "Berlin", "Madrid", "Lisbon", "Vienna", "Oslo", "Dublin",
             "Athens", "Rome"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink", "gray",
              "silver"),
    "job": ("baker", "doctor", "farmer", "teacher", "pilot", "lawyer", "nurse", "painter", "sailor", "tailor",
            "miner", "singer"),
    "pet": ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse", "lizard", "snake",
            "ferret", "pony"),
    "food": ("bread", "rice", "soup", "cheese", "apple", "mango", "pasta", "salad", "honey", "pizza", "cake",
             "noodles"),
}
UNKNOWN = "unknown"
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "th", "tr", "vr", "zh")
_SINGLE_ONSETS = tuple(o for o in _ONSETS if len(o) == 1)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_MID_CODAS = ("", "", "", "r", "l", "n")
_END_CODAS = ("", "", "n", "r", "k", "x", "th", "s", "l", "v")
_ODD_LETTERS = set("kvxz")  # every name holds one, which keeps names away from English words
# Words of the fact and question sentences: a name must not hide inside them.
_RESERVED = " ".join([*ATTRIBUTES, *(v for vs in ATTRIBUTES.values() for v in vs), UNKNOWN,
                      "question: what is answer:"]).lower()
_MAX_DRAWS = 10_000


def entity_name(rng: random.Random) -> str:
    """An invented, pronounceable, capitalised name of 2-3 syllables (e.g. "Zorvak", "Melidrax"), 4-8 letters."""
    while True:
        count = rng.choice((2, 2, 3))
        parts, coda = [], ""
        for i in range(count):
            onset = rng.choice(_SINGLE_ONSETS if coda else _ONSETS)
            coda = rng.choice(_END_CODAS if i == count - 1 else _MID_CODAS)
            parts.append(onset + rng.choice(_VOWELS) + coda)
        name = "".join(parts)
        if 4 <= len(name) <= 8 and _ODD_LETTERS & set(name):
            return name.capitalize()


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def sentence(self) -> str:
        return f"{self.entity}'s {self.attribute} is {self.value}."


@dataclass(frozen=True)
class FactQuestion:
    """A question about one entity; ``answer`` and ``fact_at`` are None when the fact was never stated."""

    entity: str
    attribute: str
    answer: str | None
    fact_at: int | None  # character offset of the fact sentence in FactDocument.text

    @property
    def stated(self) -> bool:
        return self.answer is not None

    def prompt(self) -> str:
        return f"Question: What is {self.entity}'s {self.attribute}? Answer:"

    def target(self) -> str:
        return f" {self.answer if self.answer is not None else UNKNOWN}\n"


@dataclass(frozen=True)
class FactDocument:
    text: str  # filler with each fact sentence inserted on a line of its own
    facts: tuple[Fact, ...]  # in text order
    fact_offsets: tuple[int, ...]  # character offset of each fact sentence in text
    questions: tuple[FactQuestion, ...]  # stated and unstated, shuffled


def _check_counts(num_facts: int, num_unstated: int, facts_before: float) -> None:
    if num_facts < 0 or num_unstated < 0:
        raise ConfigError(f"num_facts ({num_facts}) and num_unstated ({num_unstated}) must be >= 0")
    if num_facts + num_unstated == 0:
        raise ConfigError("num_facts and num_unstated are both 0: a document would ask nothing; raise one of them")
    if not 0 < facts_before <= 1:
        raise ConfigError(f"facts_before must lie in (0, 1] (the fraction of the text the facts go into), "
                          f"not {facts_before}")


def _line_starts(text: str, limit: float) -> list[int]:
    """Offsets of the lines of ``text`` that start before ``limit``."""
    starts, at = [], 0
    while 0 <= at < limit and at < len(text):
        starts.append(at)
        at = text.find("\n", at) + 1 or -1
    return starts


def _draw_names(rng: random.Random, count: int, filler: str) -> list[str]:
    """``count`` distinct names, none inside the filler, the sentence words or another name (any case)."""
    lower, names = filler.lower(), []
    for _ in range(_MAX_DRAWS):
        if len(names) == count:
            break
        name = entity_name(rng)
        low = name.lower()
        if low in lower or low in _RESERVED or any(low in n.lower() or n.lower() in low for n in names):
            continue
        names.append(name)
    if len(names) < count:
        raise DataError(f"could not draw {count} entity names absent from the filler in {_MAX_DRAWS} tries; "
                        "use shorter documents or fewer facts")
    return names


def fact_document(filler: str, seed: int, index: int, num_facts: int = 4, num_unstated: int = 2,
                  facts_before: float = 0.3) -> FactDocument:
    """Document ``index`` of ``seed``: ``filler`` (used whole) with ``num_facts`` fact sentences inserted.

    Facts go at distinct random line starts within the first ``facts_before`` fraction of the
    filler's characters; every stated fact gets a question, and ``num_unstated`` questions ask about
    fresh entities (random attributes) found nowhere in the text. Entities are distinct per document.
    Raises ConfigError on bad counts or a filler with too few lines in its first part.
    """
    _check_counts(num_facts, num_unstated, facts_before)
    limit = facts_before * len(filler)
    starts = _line_starts(filler, limit)
    if len(starts) < num_facts:
        raise ConfigError(f"the filler's first {facts_before:g} ({int(limit)} of {len(filler)} characters) has "
                          f"{len(starts)} line starts, too few to hold num_facts={num_facts} facts on lines of "
                          "their own; use a longer filler (doc_chars), a larger facts_before or fewer facts")
    rng = random.Random(f"hiermem.facts:{seed}:{index}")
    names = _draw_names(rng, num_facts + num_unstated, filler)
    attributes = list(ATTRIBUTES)
    facts = []
    for name in names[:num_facts]:
        attribute = rng.choice(attributes)
        facts.append(Fact(name, attribute, rng.choice(ATTRIBUTES[attribute])))
    positions = sorted(rng.sample(starts, num_facts))
    pieces, offsets, shift, prev = [], [], 0, 0
    for at, fact in zip(positions, facts):
        line = fact.sentence() + "\n"
        pieces += [filler[prev:at], line]
        offsets.append(at + shift)
        shift, prev = shift + len(line), at
    pieces.append(filler[prev:])
    questions = [FactQuestion(f.entity, f.attribute, f.value, at) for f, at in zip(facts, offsets)]
    questions += [FactQuestion(name, rng.choice(attributes), None, None) for name in names[num_facts:]]
    rng.shuffle(questions)
    return FactDocument("".join(pieces), tuple(facts), tuple(offsets), tuple(questions))


def filler_slices(text: str, length_chars: int, seed: int, index: int) -> str:
    """A deterministic slice of about ``length_chars`` characters of ``text`` from a line start to a line end.

    The slice starts at the line start before a random point (a pure function of seed and index)
    and ends after the last newline within ``length_chars``; a single longer line is kept whole.
    """
    if length_chars <= 0:
        raise ConfigError(f"length_chars must be > 0, not {length_chars}")
    if length_chars > len(text):
        raise ConfigError(f"the filler text has {len(text)} characters, fewer than the {length_chars} asked for "
                          "per document; use a shorter length or a larger corpus")
    rng = random.Random(f"hiermem.facts.filler:{seed}:{index}")
    start = text.rfind("\n", 0, rng.randrange(len(text) - length_chars + 1)) + 1  # back to a line start
    end = min(len(text), start + length_chars)
    if end < len(text):
        cut = text.rfind("\n", start, end) + 1
        end = cut if cut > start else (text.find("\n", end) + 1 or len(text))
    return text[start:end]


def load_filler(source: str = "shakespeare", split: str = "train") -> str:
    """The documents of ``split`` of ``source`` (see :func:`hiermem.data.load_documents`) joined by blank lines."""
    return "\n\n".join(d.text.strip("\n") for d in load_documents(source, split))


class FactsTask:
    """Deterministic stream of fact documents for one split: document ``i`` has about ``doc_chars`` of filler."""

    def __init__(self, filler_text: str, doc_chars: int, seed: int, num_facts: int = 4, num_unstated: int = 2,
                 facts_before: float = 0.3):
        _check_counts(num_facts, num_unstated, facts_before)
        if doc_chars <= 0 or doc_chars > len(filler_text):
            raise ConfigError(f"doc_chars must lie in [1, {len(filler_text)}] (the filler's length), not {doc_chars}")
        self.filler_text, self.doc_chars, self.seed = filler_text, doc_chars, seed
        self.num_facts, self.num_unstated, self.facts_before = num_facts, num_unstated, facts_before

    @classmethod
    def for_split(cls, split: str, doc_chars: int, source: str = "shakespeare", **kwargs) -> "FactsTask":
        """The task of ``split``: its seed from :data:`SPLIT_SEEDS`, filler from the same split of ``source``."""
        if split not in SPLIT_SEEDS:
            raise ConfigError(f"unknown split {split!r}; choose among {', '.join(SPLIT_SEEDS)}")
        return cls(load_filler(source, split), doc_chars, SPLIT_SEEDS[split], **kwargs)

    def document(self, index: int) -> FactDocument:
        filler = filler_slices(self.filler_text, self.doc_chars, self.seed, index)
        return fact_document(filler, self.seed, index, self.num_facts, self.num_unstated, self.facts_before)

    def documents(self, count: int, start: int = 0) -> list[FactDocument]:
        return [self.document(i) for i in range(start, start + count)]


@dataclass
class QASample:
    """Token ids of context, question and answer; labels are -100 except on the answer (target) tokens."""

    ids: list[int]
    labels: list[int]


def qa_prompt(context: str, question: FactQuestion) -> str:
    """The text before the answer: ``context``, a newline and the question (the question alone without context)."""
    return f"{context}\n{question.prompt()}" if context else question.prompt()


def qa_sample(tokenizer, context: str, question: FactQuestion) -> QASample:
    """One training sample: the prompt (see :func:`qa_prompt`) unlabelled, then the labelled target tokens."""
    from hiermem.evaluation.loading import tokenize

    prompt = tokenize(tokenizer, qa_prompt(context, question))
    answer = tokenize(tokenizer, question.target())
    return QASample(prompt + answer, [-100] * len(prompt) + list(answer))
