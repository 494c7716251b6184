"""The world-of-facts task: deterministic, facts stated once and early, unstated entities absent, answer-only labels."""

import random
import re

import pytest

from hiermem.data.facts import (ATTRIBUTES, SPLIT_SEEDS, UNKNOWN, Fact, FactQuestion, FactsTask, entity_name,
                                fact_document, filler_slices, load_filler, qa_sample)
from hiermem.errors import ConfigError
from hiermem.tokenizers import train_tokenizer
from tiny import tiny_tokenizer

FILLER = "".join(f"Line {i}: now is the winter of our discontent, made glorious summer by this sun.\n"
                 for i in range(200))


@pytest.fixture(scope="module")
def shakespeare():
    return {split: load_filler("shakespeare", split) for split in SPLIT_SEEDS}


def original_offsets(doc):
    """Where each fact was inserted in the filler (its offset less the fact lines before it)."""
    shift, out = 0, []
    for fact, at in zip(doc.facts, doc.fact_offsets):
        out.append(at - shift)
        shift += len(fact.sentence()) + 1
    return out


def check_document(doc, filler, facts_before):
    assert len(doc.text) == len(filler) + sum(len(f.sentence()) + 1 for f in doc.facts)
    lower = doc.text.lower()
    for fact, at in zip(doc.facts, doc.fact_offsets):
        line = fact.sentence()
        assert doc.text[at:at + len(line) + 1] == line + "\n" and (at == 0 or doc.text[at - 1] == "\n")
        assert doc.text.count(line) == 1 and lower.count(fact.entity.lower()) == 1  # stated once
        assert fact.entity.lower() not in filler.lower()
        assert fact.value in ATTRIBUTES[fact.attribute]
    assert all(at < facts_before * len(filler) for at in original_offsets(doc))
    text = doc.text
    for fact, at in reversed(list(zip(doc.facts, doc.fact_offsets))):
        text = text[:at] + text[at + len(fact.sentence()) + 1:]
    assert text == filler  # removing the fact lines gives the filler back
    stated = {(f.entity, f.attribute): (f.value, at) for f, at in zip(doc.facts, doc.fact_offsets)}
    assert len({q.entity for q in doc.questions}) == len(doc.questions)  # entities are distinct
    for q in doc.questions:
        assert q.attribute in ATTRIBUTES
        if q.answer is None:
            assert q.fact_at is None and q.entity.lower() not in lower and q.target() == f" {UNKNOWN}\n"
        else:
            assert stated[q.entity, q.attribute] == (q.answer, q.fact_at) and q.target() == f" {q.answer}\n"
    assert sum(q.answer is not None for q in doc.questions) == len(doc.facts)


def test_formats_are_exact():
    assert Fact("Zorvak", "pet", "parrot").sentence() == "Zorvak's pet is parrot."
    q = FactQuestion("Zorvak", "pet", None, None)
    assert q.prompt() == "Question: What is Zorvak's pet? Answer:" and q.target() == " unknown\n"
    assert FactQuestion("Zorvak", "pet", "cat", 3).target() == " cat\n"


def test_vocabulary_and_names():
    values = [v for vs in ATTRIBUTES.values() for v in vs]
    assert len(values) == len(set(values)) and all(len(vs) >= 10 for vs in ATTRIBUTES.values())
    assert all(re.fullmatch(r"[A-Za-z]+", v) for v in values) and UNKNOWN not in values
    rng = random.Random(0)
    names = [entity_name(rng) for _ in range(500)]
    assert all(re.fullmatch(r"[A-Z][a-z]{3,7}", n) for n in names) and len(set(names)) > 450
    assert entity_name(random.Random(5)) == entity_name(random.Random(5))


def test_document_is_deterministic_and_well_formed():
    doc = fact_document(FILLER, seed=3, index=7, num_facts=5, num_unstated=3, facts_before=0.4)
    assert doc == fact_document(FILLER, seed=3, index=7, num_facts=5, num_unstated=3, facts_before=0.4)
    assert len(doc.facts) == 5 and len(doc.questions) == 8
    check_document(doc, FILLER, 0.4)
    other = fact_document(FILLER, seed=3, index=8, num_facts=5, num_unstated=3, facts_before=0.4)
    assert other.facts != doc.facts and other.fact_offsets != doc.fact_offsets
    assert fact_document(FILLER, seed=4, index=7, num_facts=5).facts != doc.facts
    assert fact_document(FILLER, 0, 0, num_facts=0, num_unstated=2).text == FILLER  # only unstated questions
    # questions are shuffled: over documents, stated questions are not always first
    orders = {tuple(q.answer is None for q in fact_document(FILLER, 0, i).questions) for i in range(20)}
    assert len(orders) > 1


def test_names_avoid_the_filler():
    rng = random.Random("hiermem.facts:0:0")  # the document's own generator: its first names are forced out
    first = [entity_name(rng) for _ in range(4)]
    filler = FILLER + "".join(f"{name.upper()} speaks.\n" for name in first)
    doc = fact_document(filler, 0, 0, num_facts=4, num_unstated=2, facts_before=1.0)
    assert not {q.entity for q in doc.questions} & set(first)
    check_document(doc, filler, 1.0)


def test_filler_slices_cut_at_line_boundaries():
    text = load_filler("shakespeare", "validation")
    assert text.count("\n\n") > 10 and len(text) > 500_000
    for index in range(10):
        piece = filler_slices(text, 5000, seed=1, index=index)
        assert piece == filler_slices(text, 5000, seed=1, index=index)
        at = text.index(piece)
        assert (at == 0 or text[at - 1] == "\n") and piece.endswith("\n")
        assert 4000 <= len(piece) <= 5000
    assert filler_slices(text, 5000, 1, 0) != filler_slices(text, 5000, 1, 1)
    assert filler_slices("one line only, long", 5, 0, 0) == "one line only, long"  # a long line is kept whole


def test_task_over_the_corpus_splits(shakespeare):
    entities = {}
    for split, seed in SPLIT_SEEDS.items():
        task = FactsTask(shakespeare[split], doc_chars=6000, seed=seed)
        docs = task.documents(50)
        assert docs[3] == task.document(3) == task.documents(2, start=3)[0]
        assert docs == FactsTask(shakespeare[split], 6000, seed).documents(50)
        for i, doc in enumerate(docs):
            filler = filler_slices(shakespeare[split], 6000, seed, i)
            assert filler in shakespeare[split]  # the split's own text
            check_document(doc, filler, 0.3)
        entities[split] = {q.entity for d in docs for q in d.questions}
        assert len(entities[split]) > 280  # 300 questions, names nearly never repeat
    names = list(entities.values())
    assert all(len(a & b) <= 3 for i, a in enumerate(names) for b in names[i + 1:])
    val = FactsTask.for_split("validation", 6000)
    assert val.document(0) == FactsTask(shakespeare["validation"], 6000, SPLIT_SEEDS["validation"]).document(0)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    bpe = train_tokenizer([FILLER * 5, " ".join(v for vs in ATTRIBUTES.values() for v in vs)],
                          tmp_path_factory.mktemp("tok") / "bpe", "bpe", vocab_size=400)
    return {"char": tiny_tokenizer(), "bpe": bpe}


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_qa_sample_labels_exactly_the_answer(tokenizers, kind):
    tok = tokenizers[kind]
    doc = fact_document(FILLER, 0, 1, num_facts=3, num_unstated=2)
    for q in doc.questions:
        context = doc.text[q.fact_at:q.fact_at + 120] if q.answer else "Nothing is said of anyone here."
        s = qa_sample(tok, context, q)
        assert len(s.ids) == len(s.labels)
        first = next(i for i, lab in enumerate(s.labels) if lab != -100)
        assert all(lab == -100 for lab in s.labels[:first]) and s.labels[first:] == s.ids[first:]
        assert tok.decode(s.ids[first:]) == q.target()
        assert tok.decode(s.ids[:first]) == context + "\n" + q.prompt()
    assert tok.decode(qa_sample(tok, "", doc.questions[0]).ids) == doc.questions[0].prompt() + doc.questions[0].target()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_facts=-1), "num_facts"),
    (dict(num_unstated=-2), "num_unstated"),
    (dict(num_facts=0, num_unstated=0), "ask nothing"),
    (dict(facts_before=0.0), "facts_before"),
    (dict(facts_before=1.5), "facts_before"),
    (dict(num_facts=20, facts_before=0.05), "too few"),
])
def test_bad_arguments_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fact_document(FILLER, 0, 0, **kwargs)


def test_bad_task_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="too few"):
        fact_document("a single line with no room for facts", 0, 0, num_facts=2)
    with pytest.raises(ConfigError, match="doc_chars"):
        FactsTask(FILLER, len(FILLER) + 1, 0)
    with pytest.raises(ConfigError, match="facts_before"):
        FactsTask(FILLER, 1000, 0, facts_before=-0.1)
    with pytest.raises(ConfigError, match="unknown split"):
        FactsTask.for_split("dev", 1000)
    with pytest.raises(ConfigError, match="length_chars"):
        filler_slices(FILLER, 0, 0, 0)
    with pytest.raises(ConfigError, match="too few"):
        FactsTask(FILLER, 300, 0, num_facts=4).document(0)  # 300 characters hold 3-4 lines, 1-2 in the first 30%
