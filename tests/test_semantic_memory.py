"""Semantic memory: the FAISS store finds the exact nearest neighbour (flat) or ≥ 0.9 of flat's top 10
(IVF, HNSW) with the right payloads, deletes vectors and payloads, survives save -> open (memory
mapped) with identical results, answers metadata queries, and refuses missing, corrupt and mismatched
folders clearly; HMST's consolidation writes real chunks of the stream once they leave the attention
window, deduplicates them, and a search by a chunk's key returns that chunk's tokens."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.memory.semantic import DB_NAME, SemanticStore
from hiermem.models.hmst import HMST, HMSTConfig
from hiermem.models.hmst.consolidation import ConsolidationPolicy, Consolidator, read_and_consolidate

DIM = 24
KINDS = {"flat": {}, "ivf": dict(nlist=16, nprobe=8), "hnsw": dict(M=16, ef_search=64)}


def data(n=3000, q=40, seed=0):
    """Clustered vectors (n, DIM) like real embeddings, queries (q, DIM), and one payload per vector."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM))
    x = (centres[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, DIM))).astype(np.float32)
    queries = (centres[rng.integers(0, 64, q)] + 0.5 * rng.standard_normal((q, DIM))).astype(np.float32)
    payloads = [{"tokens": [i, i + 1, i + 2], "text": f"entry {i}", "source": "even" if i % 2 == 0 else "odd",
                 "created_at": 1000.0 + i, "position": i} for i in range(n)]
    return x, queries, payloads


def exact_top(x, queries, k):
    """Ids (q, k) of the k largest cosines, by numpy."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1)[:, :k]


@pytest.fixture(scope="module")
def built():
    x, queries, payloads = data()
    stores = {}
    for kind, params in KINDS.items():
        stores[kind] = SemanticStore(DIM, kind, **params)
        stores[kind].add(x, payloads)
    return x, queries, payloads, stores


@pytest.mark.parametrize("kind", list(KINDS))
def test_search_returns_the_nearest_entries_with_their_payloads(built, kind):
    x, queries, payloads, stores = built
    store = stores[kind]
    assert len(store) == len(x) and store.effective_kind == kind
    truth = exact_top(x, queries, 10)
    hits = store.search(queries, 10)
    if kind == "flat":
        assert [[h.id for h in row] for row in hits] == truth.tolist()
    recall = np.mean([len({h.id for h in row} & set(t)) / 10 for row, t in zip(hits, truth.tolist())])
    assert recall >= 0.9
    for row in hits:
        for h in row:
            assert h.payload == payloads[h.id]
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    cos = float(x[truth[0, 0]] @ queries[0] / np.linalg.norm(x[truth[0, 0]]) / np.linalg.norm(queries[0]))
    assert hits[0][0].score == pytest.approx(cos, abs=1e-5)
    assert store.search(x[7], 1)[0][0].id == 7  # a stored vector finds itself


def test_ivf_searches_exactly_until_it_has_enough_vectors_to_train():
    x, queries, payloads = data(n=800)
    store = SemanticStore(DIM, "ivf", nlist=16, nprobe=4)
    store.add(x[:500], payloads[:500])  # 500 < 39 * 16
    assert store.effective_kind == "flat" and store.train_threshold == 624
    assert [[h.id for h in r] for r in store.search(queries, 5)] == exact_top(x[:500], queries, 5).tolist()
    store.add(x[500:], payloads[500:])
    assert store.effective_kind == "ivf" and len(store) == 800
    assert store.search(x[650], 1)[0][0].payload == payloads[650]


@pytest.mark.parametrize("kind", list(KINDS))
def test_delete_removes_results_and_payloads(built, kind, tmp_path):
    x, queries, payloads, _ = built
    store = SemanticStore(DIM, kind, **KINDS[kind])
    store.add(x[:1000], payloads[:1000])
    first = store.search(queries[:3], 5)
    gone = [row[0].id for row in first]
    assert store.delete(gone + [10**9]) == len(set(gone))
    assert len(store) == 1000 - len(set(gone))
    assert store.get(gone) == [None] * len(gone)
    again = store.search(queries[:3], 5)
    assert all(h.id not in gone for row in again for h in row) and all(len(row) == 5 for row in again)
    assert (len(store.tombstones) == len(set(gone))) == (kind == "hnsw")  # HNSW keeps tombstones
    store.compact()
    assert not store.tombstones and len(store) == 1000 - len(set(gone))
    assert [[h.id for h in r] for r in store.search(queries[:3], 5)] == [[h.id for h in r] for r in again]


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_and_open_memory_mapped_give_identical_results(built, kind, tmp_path):
    x, queries, payloads, stores = built
    store = stores[kind]
    store.save(tmp_path / "s")
    opened = SemanticStore.open(tmp_path / "s", mmap=True)
    assert opened.mapped and opened.kind == kind and len(opened) == len(store)
    assert opened.search(queries, 10) == store.search(queries, 10)
    assert SemanticStore.open(tmp_path / "s", mmap=False).search(queries, 10) == store.search(queries, 10)
    # deleting from a mapped store makes tombstones; saving in place keeps them; adding reads it into RAM
    opened.delete([3, 4])
    opened.save(tmp_path / "s")
    reopened = SemanticStore.open(tmp_path / "s")
    assert len(reopened) == len(x) - 2 and reopened.get([3, 4, 5]) == [None, None, payloads[5]]
    new = reopened.add(x[:1] * 2, [{"tokens": [7], "text": "new"}])
    assert int(new[0]) == len(x) and not reopened.mapped
    reopened.compact()
    reopened.save(tmp_path / "s")
    final = SemanticStore.open(tmp_path / "s")
    assert len(final) == len(x) - 1 and final.get(new)[0]["text"] == "new"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["index-2.faiss", DB_NAME]


def test_unsaved_changes_of_an_opened_store_do_not_reach_its_folder(built, tmp_path):
    x, _, payloads, stores = built
    stores["flat"].save(tmp_path / "s")
    store = SemanticStore.open(tmp_path / "s")
    store.delete([0, 1, 2])
    store.add(x[:2], payloads[:2])
    store.close()
    again = SemanticStore.open(tmp_path / "s")
    assert len(again) == len(x) and again.get([0])[0] == payloads[0]


def test_metadata_queries(built):
    _, _, payloads, stores = built
    store = stores["flat"]
    found = store.find(source="odd", since=1010, until=1020)
    assert [i for i, _ in found] == [11, 13, 15, 17, 19] and found[0][1] == payloads[11]
    assert [i for i, _ in store.find(since=1000 + 2995)] == [2995, 2996, 2997, 2998, 2999]
    assert len(store.find(source="even", limit=7)) == 7
    assert store.find_duplicate([5, 6, 7], "entry 5") == 5 and store.find_duplicate([5, 6, 7], "x") is None


def test_missing_corrupt_and_mismatched_folders_fail_clearly(built, tmp_path):
    _, _, _, stores = built
    with pytest.raises(CheckpointError, match="does not exist"):
        SemanticStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is missing"):
        SemanticStore.open(tmp_path / "empty")
    folder = tmp_path / "s"
    stores["hnsw"].save(folder)
    with pytest.raises(CheckpointError, match="dim 24, expected 32"):
        SemanticStore.open(folder, dim=32)
    with pytest.raises(CheckpointError, match="kind 'hnsw', expected 'flat'"):
        SemanticStore.open(folder, kind="flat")
    index = next(folder.glob("index-*.faiss"))
    good = index.read_bytes()
    index.write_bytes(b"not a faiss index" * 10)
    with pytest.raises(CheckpointError, match="not a readable FAISS index"):
        SemanticStore.open(folder)
    index.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        SemanticStore.open(folder)
    index.write_bytes(good)
    db = sqlite3.connect(folder / DB_NAME)
    db.execute("DELETE FROM entries WHERE id < 10")
    db.commit(), db.close()
    with pytest.raises(CheckpointError, match="inconsistent"):
        SemanticStore.open(folder)
    (folder / DB_NAME).write_bytes(b"garbage" * 1000)
    with pytest.raises(CheckpointError, match="corrupt"):
        SemanticStore.open(folder)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ConfigError, match="unknown index kind"):
        SemanticStore(8, "lsh")
    store = SemanticStore(8)
    with pytest.raises(ConfigError, match=r"shape \(n, 8\)"):
        store.add(np.ones((2, 9)), [{}, {}])
    with pytest.raises(ConfigError, match="2 vectors but 1 payloads"):
        store.add(np.ones((2, 8)), [{}])
    with pytest.raises(ConfigError, match="zero vectors"):
        store.add(np.zeros((1, 8)), [{}])
    with pytest.raises(ConfigError, match="JSON"):
        store.add(np.ones((1, 8)), [{"thing": object()}])
    assert store.search(np.ones(8), 3) == [[]] and len(store) == 0


# --- consolidation on a real tiny HMST -------------------------------------------------------------
def tiny_hmst(seed=0) -> HMST:
    torch.manual_seed(seed)
    model = HMST(HMSTConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, attention_window=6,
                            num_experts=4, top_k=2, intermediate_size=12, ssm_every=1, ssm_state_size=4,
                            ssm_head_dim=8, ssm_chunk=4))
    with torch.no_grad():  # move parameters off their initial values so that hidden states depend on tokens
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def stream(n=200, seed=3):
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed))


def test_hmst_returns_its_final_hidden_states_on_request():
    model, ids = tiny_hmst(), stream(30)[None]
    plain = model(ids)
    out = model(ids, return_hidden=True)
    assert plain.hidden is None and out.hidden.shape == (1, 30, 16)
    torch.testing.assert_close(model.logits(out.hidden), plain.logits)
    first = model(ids[:, :12], return_hidden=True, return_logits=False)  # chunked calls compose
    second = model(ids[:, 12:], state=first.state, return_hidden=True)
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), out.hidden, rtol=1e-4, atol=1e-5)


def test_consolidation_writes_real_chunks_once_they_leave_the_window():
    model, ids = tiny_hmst(), stream(200)
    store = SemanticStore(16, "flat")
    policy = ConsolidationPolicy(chunk_tokens=8, every_tokens=16, dedup_threshold=1.01, min_tokens=4)
    cons = Consolidator.for_model(model, store, policy, decode=lambda t: " ".join(map(str, t)), source="doc")
    assert cons.policy.attention_window == 6
    with torch.no_grad():
        hidden = model(ids[None], return_hidden=True).hidden[0]  # (200, 16)
    for a in range(0, 200, 10):  # observe in pieces of 10: writes happen at 16, 32, 48, ... tokens
        written = cons.observe(ids[a:a + 10], hidden[a:a + 10])
        read = a + 10
        ends = [p["end"] for _, p in store.find(source="doc")]
        assert all(e + 6 <= read for e in ends)  # nothing written while still in the window
        if read // 16 > (read - 10) // 16:  # a multiple of 16 was passed: every chunk out of the window
            assert written and max(ends) == (read - 6) // 8 * 8
        else:
            assert not written
    cons.flush()
    entries = store.find(source="doc")
    assert [p["start"] for _, p in entries] == list(range(0, 200, 8)) and cons.stats.written == 25
    for i, p in entries:
        chunk = ids[p["start"]:p["end"]].tolist()
        assert p["tokens"] == chunk and p["text"] == " ".join(map(str, chunk))
        key = hidden[p["start"]:p["end"]].mean(0).numpy()
        assert store.search(key, 1)[0][0].id == i  # a search by the chunk's key returns the chunk
    assert len(cons.tokens) == 0 and cons.start == 200


def test_consolidation_deduplicates_exact_and_near_copies(tmp_path):
    model, ids = tiny_hmst(), stream(120)
    store = SemanticStore(16, "hnsw", M=8)
    policy = ConsolidationPolicy(chunk_tokens=10, every_tokens=30, dedup_threshold=1.01)
    first = Consolidator.for_model(model, store, policy, source="a")
    read_and_consolidate(model, ids, first)
    assert first.stats.written == 12 and len(store) == 12
    second = Consolidator.for_model(model, store, policy, source="b")  # the same text again: all exact copies
    read_and_consolidate(model, ids, second, call_tokens=7)
    assert second.stats.written == 0 and second.stats.skipped_exact == 12 and not store.find(source="b")
    near = ConsolidationPolicy(chunk_tokens=10, every_tokens=30, dedup_threshold=0.85)
    one, two = ids[10:20].clone(), ids[10:20].clone()
    one[3], two[7] = (one[3] + 1) % 50, (two[7] + 5) % 50  # two one-token edits of a chunk
    repeated = torch.cat([ids[:10], one, two, ids[:10], stream(40, seed=9)])
    third = Consolidator.for_model(model, SemanticStore(16), near, source="c")
    read_and_consolidate(model, repeated, third)
    s = third.stats  # the second edit is a near copy of the first (cosine 0.91); chunk 0 returns exactly
    assert (s.written, s.skipped_similar, s.skipped_exact) == (6, 1, 1)
    kept = third.store.find(source="c")
    with torch.no_grad():
        hidden = model(repeated[None], return_hidden=True).hidden[0]
    keys = torch.stack([hidden[p["start"]:p["end"]].mean(0) for _, p in kept])
    keys = torch.nn.functional.normalize(keys, dim=-1)
    cos = keys @ keys.T - 2 * torch.eye(len(kept))
    assert float(cos.max()) < 0.9  # no two stored keys are near duplicates
    third.store.save(tmp_path / "mem")
    hits = SemanticStore.open(tmp_path / "mem").search(keys[0].numpy(), 1)[0]
    assert hits[0].payload["tokens"] == kept[0][1]["tokens"] and hits[0].payload["source"] == "c"


def test_consolidation_policy_checks():
    with pytest.raises(ConfigError, match="chunk_tokens"):
        ConsolidationPolicy(chunk_tokens=0)
    with pytest.raises(ConfigError, match="hidden size"):
        Consolidator.for_model(tiny_hmst(), SemanticStore(8))
    with pytest.raises(ConfigError, match="attention_window"):
        Consolidator(SemanticStore(8), ConsolidationPolicy())


def test_a_missing_faiss_names_the_install_command(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'faiss-cpu>=1.8'"):
        SemanticStore(8)
