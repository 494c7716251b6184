"""HMST as a system: line-aligned consolidation, the retriever, answering with gates over a session's
own store, saving and loading the trained parts, and the stage-2/3 commands on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hiermem.cli import main
from hiermem.data.facts import FactsTask, load_filler
from hiermem.errors import CheckpointError
from hiermem.models.hmst import HMST, HMSTConfig
from hiermem.models.hmst.consolidation import chunk_spans
from hiermem.models.hmst.controller import ControllerConfig, MetaController
from hiermem.models.hmst.critic import Critic, CriticConfig
from hiermem.models.hmst.retriever import (RetrievalExample, Retriever, RetrieverConfig, fit_retriever,
                                           retrieval_accuracy)
from hiermem.models.hmst.system import CRITIC_EXTRA, SYSTEM_WEIGHTS, HMSTSystem, SystemConfig, all_gates
from hiermem.training.hmst_facts import document_tokens
from scratch_family import save_with_byte_tokenizer


def tiny_hmst(vocab: int) -> HMST:
    torch.manual_seed(0)
    return HMST(HMSTConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, attention_window=16,
                           num_experts=4, top_k=2, intermediate_size=32, ssm_every=2, ssm_state_size=4,
                           ssm_head_dim=16, early_exit_layer=1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hmst")
    save_with_byte_tokenizer(tiny_hmst, root)
    return root / "m"


@pytest.fixture(scope="module")
def docs():
    return FactsTask(load_filler("shakespeare", "validation"), 700, seed=5).documents(2)


def test_chunks_end_after_their_last_newline_and_never_cut_a_line():
    tokens = np.array([5, 5, 9, 5, 5, 5, 9, 5, 5, 5, 5, 5, 5])  # 9 = newline
    assert chunk_spans(tokens, 4) == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert chunk_spans(tokens, 4, final=False) == [(0, 4), (4, 8), (8, 12)]
    spans = chunk_spans(tokens, 5, boundary_tokens=(9,))
    assert spans == [(0, 3), (3, 7), (7, 12), (12, 13)]  # a line longer than a chunk is cut at the size
    assert [b for _, b in spans][:2] == [3, 7]  # every other chunk ends right after a newline


def test_the_retriever_learns_which_chunk_answers():
    # every chunk states one "fact": a marker direction plus its entity's random direction, amid noise
    gen = torch.Generator().manual_seed(0)
    d, n = 16, 80
    marker = torch.randn(d, generator=gen)

    def fact(entity):
        return 2 * marker + 1.5 * entity

    examples = []
    for i in range(n):
        entities = torch.randn(5, d, generator=gen)
        chunks = [torch.randn(12, d, generator=gen) for _ in range(5)]
        for j in range(5):
            chunks[j][3 + j] = fact(entities[j])
        pos = i % 5
        query = torch.randn(6, d, generator=gen)
        query[2] = fact(entities[pos])
        examples.append(RetrievalExample(query, chunks, pos))
    r = Retriever(RetrieverConfig(hidden_size=d, dim=8))
    before = retrieval_accuracy(r, examples[60:])
    losses = fit_retriever(r, examples[:60], epochs=80, lr=1e-2, generator=gen)
    assert losses[-1] < losses[0] / 2
    after = retrieval_accuracy(r, examples[60:])
    assert after >= 0.8 and after > before + 0.2, (before, after)


def test_answers_read_only_their_own_session_and_gates_change_the_cost(folder, docs):
    from hiermem.models import load_model

    model = load_model(folder)
    system = HMSTSystem(model, model.tokenizer, config=SystemConfig(chunk_tokens=24, max_answer_tokens=4))
    a, b = system.new_session("a"), system.new_session("b")
    for session, doc in ((a, docs[0]), (b, docs[1])):
        ids, starts = document_tokens(system.tokenizer, doc)
        assert [system.tokenizer.decode(ids[s:s + 5]) for s in starts] == [f.sentence()[:5] for f in doc.facts]
        system.read_ids(session, torch.tensor([ids]))
    texts_a = {p["text"] for _, p in a.store.find()}
    if a.consolidator.stats.skipped_exact == 0:  # every chunk written: real content, in order
        assert "".join(p["text"] for _, p in a.store.find()) == docs[0].text
    assert all(t in docs[0].text for t in texts_a)
    assert not texts_a & {p["text"] for _, p in b.store.find() if p["text"].strip()}
    q = docs[0].questions[0].prompt()
    full = system.answer(a, q, all_gates(True) | {"verify": False})
    again = system.answer(a, q, all_gates(True) | {"verify": False})
    assert (full.text, full.flops) == (again.text, again.flops)  # greedy: deterministic
    assert full.retrieved and all(p["source"] == "a" and p["text"] in docs[0].text for p in full.retrieved)
    bare = system.answer(a, q, {})  # every gate closed: no retrieval, answer right after the question
    assert not bare.retrieved and bare.latency_units < full.latency_units
    assert full.features.shape == (system.feature_dim,)
    assert full.critic_features.shape == (system.feature_dim + CRITIC_EXTRA,)


def test_system_parts_save_load_and_refuse_other_weights(folder, tmp_path):
    from hiermem.models import load_model

    model = load_model(folder)
    torch.manual_seed(1)
    system = HMSTSystem(model, model.tokenizer, Retriever(RetrieverConfig(hidden_size=32, dim=8)),
                        MetaController(ControllerConfig(feature_dim=35, max_steps=1)),
                        Critic(CriticConfig(feature_dim=35 + CRITIC_EXTRA)), SystemConfig(chunk_tokens=24))
    system.save(tmp_path / "s", stage=3)
    loaded, stage = HMSTSystem.load(tmp_path / "s")
    assert stage == 3
    for name in ("retriever", "controller", "critic"):
        for (k, v), (k2, v2) in zip(getattr(system, name).state_dict().items(),
                                    getattr(loaded, name).state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    x = torch.randn(3, 35)
    assert torch.equal(system.controller.greedy(x).actions, loaded.controller.greedy(x).actions)
    # the parts belong to these weights: other weights are refused
    other = load_model(folder)
    with torch.no_grad():
        other.embedding.weight.add_(1.0)
    other.save_pretrained(tmp_path / "s")
    with pytest.raises(CheckpointError, match="other HMST weights"):
        HMSTSystem.load(tmp_path / "s")
    (tmp_path / "s" / SYSTEM_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        HMSTSystem.load(tmp_path / "s")


def test_stage_commands_run_in_order_and_refuse_the_wrong_stage_or_size(folder, tmp_path):
    common = ["--facts-documents", "2", "--document-chars", "700"]
    s2, s3 = tmp_path / "s2", tmp_path / "s3"
    assert main(["train", "hmst", "--stage", "2", "--model-path", str(folder), "--output-dir", str(s2),
                 "--steps", "2", "--batch-size", "2", "--window", "64", "--eval-every", "0",
                 "--no-tensorboard", "--no-progress", *common]) == 0
    report = json.loads((s2 / "stage2_report.json").read_text())
    assert report["steps"] == 2 and 0 <= report["retriever"]["val_recall_at_1"] <= 1
    assert HMSTSystem.load(s2 / "final")[1] == 2
    assert main(["train", "hmst", "--stage", "2", "--model-path", str(s2 / "final"), "--output-dir",
                 str(tmp_path / "again"), *common]) == 2  # stage 2 starts from stage 1 only
    assert main(["train", "hmst", "--stage", "3", "--model-path", str(s2 / "final"), "--model-size", "micro",
                 "--output-dir", str(s3), *common]) == 2  # not the micro preset
    assert main(["train", "hmst", "--stage", "3", "--model-path", str(s2 / "final"), "--output-dir", str(s3),
                 "--ppo-iterations", "2", *common]) == 0
    report = json.loads((s3 / "stage3_report.json").read_text())
    policies = report["validation"]
    assert {"all_open", "all_closed", "controller", "oracle", "best_fixed"} <= set(policies)
    for p in policies.values():
        assert 0 <= p["accuracy"] <= 1 and 0 <= p["ece"] <= 1
    assert policies["oracle"]["reward"] >= max(p["reward"] for p in policies.values()) - 1e-6
    system, stage = HMSTSystem.load(s3 / "final")
    assert stage == 3 and system.controller is not None and system.critic is not None


def test_the_released_system_loads_and_answers_from_its_store():
    from hiermem.models import released_weights

    if released_weights("hmst-micro-facts") is None:
        pytest.skip("hmst-micro-facts is not installed")
    system, stage = HMSTSystem.load("hmst-micro-facts")
    assert stage == 3 and system.retriever and system.controller and system.critic
    doc = FactsTask(load_filler("shakespeare", "test"), 1500, seed=11).document(0)
    session = system.new_session("doc")
    system.read_ids(session, torch.tensor([document_tokens(system.tokenizer, doc)[0]]))
    question = next(q for q in doc.questions if q.answer is not None)
    forced = system.answer(session, question.prompt(), {"semantic": True, "episodic": True})
    assert forced.retrieved and forced.text  # it read a stored chunk back and answered something
    chosen = system.answer(session, question.prompt())  # the controller's gates
    assert set(chosen.gates) == set(all_gates()) and chosen.text == system.answer(session, question.prompt()).text
