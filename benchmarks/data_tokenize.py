"""Time the data pipeline on a built-in corpus: reading, first tokenisation, cache reuse, windows.

    python benchmarks/data_tokenize.py [--source shakespeare] [--backbone smollm2-135m] [--threads 1]

Writes ``benchmarks/results/data_tokenize_<source>.json``. The token cache goes to a temporary
folder so every run measures a cold build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="shakespeare")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="RAYON/tokenizer and torch threads")
    parser.add_argument("--window", type=int, default=2048)
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoTokenizer

    from hiermem.backbones import resolve_spec
    from hiermem.data import WindowLoader, build_corpus, load_documents

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_spec(args.backbone)[0]))
    result = {"source": args.source, "backbone": args.backbone, "threads": args.threads,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "splits": {}}
    with tempfile.TemporaryDirectory() as root:
        for split in ("train", "validation", "test"):
            t0 = time.perf_counter()
            docs = load_documents(args.source, split)
            t1 = time.perf_counter()
            corpus = build_corpus(args.source, tokenizer, split, cache_root=root)
            t2 = time.perf_counter()
            build_corpus(args.source, tokenizer, split, cache_root=root)
            t3 = time.perf_counter()
            loader = WindowLoader(corpus, args.window, 1)
            batches = [next(loader) for _ in range(min(len(loader), 50))]
            t4 = time.perf_counter()
            result["splits"][split] = {
                "documents": len(docs), "characters": sum(len(d.text) for d in docs),
                "tokens": corpus.num_tokens, "load_documents_s": round(t1 - t0, 3),
                "first_build_s": round(t2 - t1, 3), "tokens_per_s": round(corpus.num_tokens / (t2 - t1)),
                "cached_build_s": round(t3 - t2, 3), f"windows_of_{args.window}": loader.num_windows,
                "batch_ms": round(1000 * (t4 - t3) / max(1, len(batches)), 3)}
    total = result["splits"]
    result["total_tokens"] = sum(s["tokens"] for s in total.values())
    result["total_first_build_s"] = round(sum(s["first_build_s"] for s in total.values()), 3)
    out = Path(__file__).parent / "results" / f"data_tokenize_{args.source}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
