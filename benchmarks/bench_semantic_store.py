"""Semantic store at scale: build time, size on disk, RSS memory-mapped vs read into RAM, single-query
latency p50/p99 and recall@10 against exact search, for each index kind of ``SemanticStore``.

Data: ``--entries`` vectors of ``--dim`` float32, generated in chunks of 50,000 from seeded RNGs (the
generator never holds the whole set): ``clustered`` (default) draws each vector as one of 4,096
Gaussian centres (N(0, 1) per coordinate) plus N(0, 0.5^2) noise, a stand-in for real embeddings,
which cluster;
``gaussian`` is isotropic noise, the hardest case for IVF and HNSW. Every entry has a payload of 32
int32 token ids, a text and a source in the SQLite file. Queries come from the same distribution
(other draws, same centres). Exact top-10 is computed with numpy by regenerating the data chunk by chunk.

Each kind is built in a fresh process (store.add in chunks, IVF trained by the store itself on the
first chunk once it holds 39 * nlist vectors, then save), then opened in fresh processes, memory
mapped and read into RAM, for the RSS (total, and anonymous = not file-backed) after open and after
the queries, and the latency of ``--queries`` single-vector searches (k=10; the page cache is warm from
the build). Search parameters (IVF nprobe, HNSW ef_search) vary per query process on the same index.

    OMP_NUM_THREADS=1 python benchmarks/bench_semantic_store.py            # 1M x 128: ~30 min, ~3 GB disk
    OMP_NUM_THREADS=1 python benchmarks/bench_semantic_store.py --entries 100000 --kinds flat hnsw
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
CHUNK = 50_000


def vectors(seed: int, start: int, stop: int, dim: int, data: str, queries: bool = False) -> np.ndarray:
    """Rows [start, stop) (n, dim) float32 of the data set drawn with ``seed``, chunk by chunk;
    ``queries``: other draws from the same distribution (the same centres)."""
    centres = np.random.default_rng([seed, 0]).standard_normal((4096, dim)).astype(np.float32)
    parts = []
    for c in range(start // CHUNK, (stop - 1) // CHUNK + 1):
        rng = np.random.default_rng([seed, 2 if queries else 1, c])
        labels = rng.integers(0, 4096, CHUNK)
        x = rng.standard_normal((CHUNK, dim), dtype=np.float32)
        if data == "clustered":
            x = centres[labels] + 0.5 * x
        lo, hi = max(start, c * CHUNK) - c * CHUNK, min(stop, (c + 1) * CHUNK) - c * CHUNK
        parts.append(x[lo:hi])
    return np.concatenate(parts)


def payloads(start: int, stop: int) -> list[dict]:
    rng = np.random.default_rng([7, start])
    toks = rng.integers(0, 32000, (stop - start, 32), dtype=np.int32)
    return [{"tokens": toks[i - start], "text": f"entry {i}", "source": f"doc-{i // 1000}", "created_at": float(i)}
            for i in range(start, stop)]


def memory() -> dict:
    """RSS, anonymous and file-backed resident memory of this process (MB)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[{"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}[key]] = round(int(value.split()[0]) / 1024, 1)
    return out


def build_worker(a) -> dict:
    from hiermem.memory.semantic import SemanticStore

    store = SemanticStore(a.dim, a.kind, nlist=a.nlist, nprobe=a.nprobe[0], M=a.M,
                          ef_construction=a.ef_construction, ef_search=a.ef_search[0])
    add_s = gen_s = 0.0
    for s in range(0, a.entries, CHUNK):
        t0 = time.perf_counter()
        x, p = vectors(a.seed, s, min(s + CHUNK, a.entries), a.dim, a.data), payloads(s, min(s + CHUNK, a.entries))
        t1 = time.perf_counter()
        store.add(x, p)
        gen_s, add_s = gen_s + t1 - t0, add_s + time.perf_counter() - t1
    peak_build = memory()
    t0 = time.perf_counter()
    store.save(a.folder)
    save_s = time.perf_counter() - t0
    sizes = {f.name: f.stat().st_size / 2**20 for f in Path(a.folder).iterdir()}
    return {"add_s": round(add_s, 1), "save_s": round(save_s, 1), "generate_s": round(gen_s, 1),
            "effective_kind": store.effective_kind, "entries": len(store),
            "index_mb": round(sum(v for k, v in sizes.items() if k.endswith(".faiss")), 1),
            "payload_mb": round(sum(v for k, v in sizes.items() if k.endswith(".sqlite")), 1),
            "memory_after_build": peak_build}


def query_worker(a) -> dict:
    from hiermem.memory.semantic import SemanticStore

    before = memory()
    t0 = time.perf_counter()
    store = SemanticStore.open(a.folder, mmap=bool(a.mmap))
    open_s = time.perf_counter() - t0
    after_open = memory()
    store.set_search_params(nprobe=a.nprobe[0], ef_search=a.ef_search[0])
    queries = vectors(a.seed, 0, a.queries, a.dim, a.data, queries=True)
    truth = np.load(Path(a.folder).parent / "truth.npy")
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.search(q, 10)[0]  # includes reading the 10 payloads from SQLite
        lat.append((time.perf_counter() - t) * 1000)
        found.append([h.id for h in hits])
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth.tolist())]))
    return {"open_s": round(open_s, 2), "mapped": store.mapped, "memory_before_open": before,
            "memory_after_open": after_open, "memory_after_queries": memory(),
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(float(np.mean(lat)), 3), "recall_at_10": round(recall, 4)}


def exact_truth(a, path: Path) -> float:
    """Exact top-10 ids (queries, 10) by cosine, numpy over chunks; returns seconds."""
    t0 = time.perf_counter()
    q = vectors(a.seed, 0, a.queries, a.dim, a.data, queries=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_s, best_i = np.full((len(q), 10), -np.inf, np.float32), np.zeros((len(q), 10), np.int64)
    for s in range(0, a.entries, CHUNK):
        x = vectors(a.seed, s, min(s + CHUNK, a.entries), a.dim, a.data)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sc = q @ x.T  # (queries, chunk)
        top = np.argpartition(-sc, 10, axis=1)[:, :10]
        cand_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + s], 1)
        order = np.argsort(-cand_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    np.save(path, best_i)
    return time.perf_counter() - t0


def settings(kind: str, a) -> list[tuple[str, list[str]]]:
    if kind == "ivf":
        return [(f"nprobe {n}", ["--nprobe", str(n)]) for n in a.nprobe]
    if kind == "hnsw":
        return [(f"ef_search {e}", ["--ef-search", str(e)]) for e in a.ef_search]
    return [("exact", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--M", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the stores (default: a temporary folder, removed)")
    ap.add_argument("--name", default="semantic_store", help="results/<name>.{json,md}")
    ap.add_argument("--worker", choices=["build", "query"])
    ap.add_argument("--kind", default="flat")
    ap.add_argument("--folder")
    ap.add_argument("--mmap", type=int, default=1)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(build_worker(a) if a.worker == "build" else query_worker(a)))
        return

    import torch
    from common import machine, markdown_table, print_header, run_worker, write_results

    info = machine(torch.device("cpu"))
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    print_header("Semantic store", info)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-semantic-"))
    work.mkdir(parents=True, exist_ok=True)
    common_args = ["--entries", str(a.entries), "--dim", str(a.dim), "--data", a.data, "--seed", str(a.seed),
                   "--queries", str(a.queries), "--nlist", str(a.nlist), "--M", str(a.M),
                   "--ef-construction", str(a.ef_construction)]
    truth_s = exact_truth(a, work / "truth.npy")
    print(f"exact top-10 of {a.queries} queries by numpy: {truth_s:.1f} s", flush=True)
    results, rows = [], []
    try:
        for kind in a.kinds:
            folder = work / kind
            shutil.rmtree(folder, ignore_errors=True)
            build = run_worker(Path(__file__), ["build", "--kind", kind, "--folder", str(folder), *common_args],
                               timeout=4 * 3600)
            print(kind, "build", build, flush=True)
            if "error" in build:
                results.append({"kind": kind, "build": build})
                continue
            for label, extra in settings(kind, a):
                for mmap in (1, 0):
                    q = run_worker(Path(__file__), ["query", "--kind", kind, "--folder", str(folder), "--mmap",
                                                    str(mmap), *common_args, *extra], timeout=3600)
                    print(kind, label, "mmap" if mmap else "ram", q, flush=True)
                    results.append({"kind": kind, "setting": label, "mmap": bool(mmap), "build": build, "query": q})
                    if "error" in q:
                        continue
                    base = q["memory_before_open"]
                    rows.append([kind, label, "mmap" if mmap else "RAM", build["add_s"], build["save_s"],
                                 build["index_mb"], build["payload_mb"],
                                 round(q["memory_after_open"]["rss_mb"] - base["rss_mb"], 1),
                                 round(q["memory_after_queries"]["rss_mb"] - base["rss_mb"], 1),
                                 round(q["memory_after_queries"]["anon_mb"] - base["anon_mb"], 1),
                                 q["p50_ms"], q["p99_ms"], f"{q['recall_at_10']:.3f}"])
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    headers = ["kind", "search", "open", "build s", "save s", "index MB", "payloads MB", "RSS +MB after open",
               "RSS +MB after queries", "anon +MB after queries", "p50 ms", "p99 ms", "recall@10"]
    table = markdown_table(headers, rows)
    print(table)
    md = (f"# Semantic store: {a.entries:,} entries x {a.dim} dims\n\n"
          f"`OMP_NUM_THREADS={info['omp_num_threads']} .venv/bin/python {info['command']}` on {info['cpu']} "
          f"({info['cores']} cores), faiss {faiss_version()}, load average {info['load_average']}.\n\n"
          f"Data: {a.data} (see the script's docstring), payload per entry: 32 int32 tokens, text, source. "
          f"IVF: nlist {a.nlist}, trained by the store on its first {39 * a.nlist:,}+ vectors. HNSW: M {a.M}, "
          f"ef_construction {a.ef_construction}. build s: all store.add calls (index + payload rows + IVF "
          f"training), data generation excluded; save s: writing index and payload files. RSS columns: growth "
          f"of the query process over its start (file-backed mapped pages count in RSS but belong to the "
          f"page cache; anon is the process's own memory). Latency: {a.queries} single-vector searches, k = 10, "
          f"including the payload reads from SQLite, warm page cache. recall@10: against exact numpy top-10 "
          f"({truth_s:.0f} s for all queries).\n\n" + table)
    data = {"machine": info, "config": {k: v for k, v in vars(a).items() if k not in ("worker", "kind", "folder",
                                                                                       "mmap")},
            "exact_truth_s": round(truth_s, 1), "results": results}
    for path in write_results(a.name, data, md):
        print(f"wrote {path}")


def faiss_version() -> str:
    import faiss

    return faiss.__version__


if __name__ == "__main__":
    main()
