"""Inference throughput and memory against input length: HMT vs the backbone alone.

Every method reads the same text (Shakespeare, test split first) and computes the next-token NLL of
every token, exactly as ``hiermem eval`` does; nothing that grows with the input is kept. Each
(method, length) runs in a fresh process, so resident-set growth (peak during the run minus the
size before it) is measured cleanly.

- ``hmt``: HMT stage 2, FIFO, N=300, segment 222 + sensory 32 + 2 memory = 256 backbone positions
  (memory untrained: speed does not depend on its values);
- ``chunks``: the backbone on independent 256-token chunks;
- ``sliding``: the backbone over a 256-token window moved by 128 tokens (twice the work of chunks);
- ``full``: the backbone over the whole input at once (in 512-token blocks with its KV cache).

Targets (see DESIGN.md): HMT >= 0.65x the chunked backbone's tokens/s; HMT RSS growth <= 1.5x
chunks' and flat from 4k to 64k tokens. Ratios are taken between methods measured in the same run.

    python benchmarks/bench_inference.py                        # full run, CPU (CUDA when present)
    python benchmarks/bench_inference.py --lengths 1024 4096    # quick
    python benchmarks/bench_inference.py --worker --method hmt --tokens 4096 --profile   # one profiled run
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, RssPeak, benchmark_tokens, machine, markdown_table, pick_device,  # noqa: E402
                    print_header, run_worker, sync, write_results)

METHODS = ("hmt", "chunks", "sliding", "full")
# the public code's configuration: 256 backbone positions per segment = 222 + 32 sensory + 2 memory, no BOS
HMT_CONFIG = dict(segment_length=222, sensory_length=32, cache_size=300, stage=2, eviction="fifo", segment_bos=False)
CHUNK, STRIDE = 256, 128


def make_reader(method: str, backbone, tokens: int):
    """A function ids (T,) -> per-token NLL (T-1,) for ``method``."""
    from hiermem.evaluation.perplexity import hmt_nll, window_nll

    if method == "hmt":
        from hiermem.models.hmt import HMT, HMTConfig

        model = HMT(backbone.model, HMTConfig(**HMT_CONFIG), bos_token_id=backbone.tokenizer.bos_token_id).eval()
        return lambda ids: hmt_nll(model, ids)[0]
    span = {"chunks": (CHUNK, CHUNK), "sliding": (CHUNK, STRIDE), "full": (tokens, tokens)}[method]
    return lambda ids: window_nll(backbone.model, ids, *span, batch_size=1, block=512)


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    from hiermem.backbones import DEFAULT_BACKBONE, load_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the untrained recall projections: the same ppl column on every run
    device = pick_device(args.device)
    backbone = load_backbone(DEFAULT_BACKBONE, device=device, dtype=args.dtype)
    ids = benchmark_tokens(backbone.tokenizer, args.tokens)
    read = make_reader(args.method, backbone, args.tokens)
    with torch.no_grad():
        read(ids[:600])  # warm-up: kernels, allocator, two HMT segments
        gc.collect()
        profiler = cProfile.Profile() if args.profile else None
        with RssPeak(device) as mem:
            if profiler:
                profiler.enable()
            start = time.perf_counter()
            nll = read(ids)
            sync(device)
            seconds = time.perf_counter() - start
            if profiler:
                profiler.disable()
    out = {"method": args.method, "tokens": args.tokens, "seconds": round(seconds, 2),
           "tok_s": round(args.tokens / seconds, 1), "ppl": round(float(nll.double().mean().exp()), 3), **mem.report()}
    if profiler:
        stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(30)
        out["profile"] = [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "cumulative_s": round(ct, 3)}
                          for (f, line, name), (_, nc, _, ct, _) in
                          sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:25]]
    print(json.dumps(out))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method and "tok_s" in r]
        if pts:
            a.plot([r["tokens"] for r in pts], [r["tok_s"] for r in pts], marker="o", label=method)
            b.plot([r["tokens"] for r in pts], [r["rss_growth_mb"] for r in pts], marker="o", label=method)
    a.set(xscale="log", xlabel="input tokens", ylabel="tokens / s", title="Throughput")
    b.set(xscale="log", xlabel="input tokens", ylabel="RSS growth during the run (MB)", title="Memory")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(rows: list[dict]) -> tuple[dict, list[str]]:
    """Ratios between methods of this run, against the targets; returns (numbers, human-readable lines)."""
    by = {(r["method"], r["tokens"]): r for r in rows if "tok_s" in r}
    ratios, lines = {}, []
    for n in sorted({r["tokens"] for r in rows}):
        h, c = by.get(("hmt", n)), by.get(("chunks", n))
        if h and c:
            speed = h["tok_s"] / c["tok_s"]
            mem = h["rss_growth_mb"] / max(c["rss_growth_mb"], 1.0)
            ratios[n] = {"hmt_vs_chunks_speed": round(speed, 3), "hmt_vs_chunks_rss_growth": round(mem, 2)}
            lines.append(f"{n:>6} tokens: HMT {h['tok_s']:.0f} tok/s = {speed:.3f}x chunks (target >= 0.65: "
                         f"{'met' if speed >= 0.65 else 'MISSED'}); RSS growth {h['rss_growth_mb']:.0f} MB = "
                         f"{mem:.2f}x chunks' (target <= 1.5: {'met' if mem <= 1.5 else 'MISSED'})")
    flat = [n for n in (4096, 65536) if ("hmt", n) in by]
    if len(flat) == 2:
        g4, g64 = by[("hmt", 4096)]["rss_growth_mb"], by[("hmt", 65536)]["rss_growth_mb"]
        ratios["hmt_rss_growth_64k_over_4k"] = round(g64 / max(g4, 1.0), 2)
        lines.append(f"HMT RSS growth 4k -> 64k: {g4:.0f} -> {g64:.0f} MB ({g64 / max(g4, 1.0):.2f}x; flat target: "
                     f"{'met' if g64 <= 1.25 * g4 + 20 else 'MISSED'})")
    return ratios, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help="(worker) method to measure")
    p.add_argument("--tokens", type=int, help="(worker) input length")
    p.add_argument("--profile", action="store_true", help="(worker) cProfile the run; top functions to stderr")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 4096, 16384, 65536])
    p.add_argument("--full-max", type=int, default=8192, help="longest input for the full-context backbone")
    p.add_argument("--sliding-max", type=int, default=16384, help="longest input for the sliding window")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--name", default="inference", help="results file name under benchmarks/results/")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    info = machine(pick_device(args.device))
    print_header("HMT inference benchmark", info)
    caps = {"full": args.full_max, "sliding": args.sliding_max}
    rows = []
    for n in sorted(args.lengths):
        for method in args.methods:
            if n > caps.get(method, n):
                continue
            extra = ["--device", args.device] if args.device else []
            res = run_worker(Path(__file__), ["--method", method, "--tokens", str(n), "--threads", str(args.threads),
                                              "--dtype", args.dtype, *extra], args.timeout)
            rows.append({"method": method, "tokens": n, **res})
            print(f"{method:>8} {n:>6} tokens: " + (res.get("error") or
                  f"{res['tok_s']:7.1f} tok/s, RSS growth {res['rss_growth_mb']:7.1f} MB, ppl {res['ppl']:.2f}"),
                  flush=True)
    ratios, lines = summarize(rows)
    print("\n" + "\n".join(lines))
    table = markdown_table(["method", "tokens", "tok/s", "RSS growth (MB)", "seconds", "ppl"],
                           [[r["method"], r["tokens"], r.get("tok_s", "-"), r.get("rss_growth_mb", r.get("error", "-")),
                             r.get("seconds", "-"), r.get("ppl", "-")] for r in rows])
    md = (f"# Inference: HMT vs the backbone\n\n`{info['command']}`\n\nMachine: {info['cpu']}, {info['cores']} cores, "
          f"{info['torch_threads']} torch threads, {info.get('gpu', info['device'])}; torch {info['torch']}, "
          f"transformers {info['transformers']}. Load average at start: {info['load_average']}.\n\n"
          f"HMT: {HMT_CONFIG}; chunks {CHUNK}; sliding window {CHUNK} stride {STRIDE}; full context in 512-token "
          "blocks with KV cache. Every method computes the NLL of every token.\n\n"
          f"{table}\n" + "\n".join(f"- {ln}" for ln in lines) + "\n\n![throughput and memory](" + args.name + ".png)\n")
    paths = write_results(args.name, {"machine": info, "hmt_config": HMT_CONFIG, "rows": rows, "ratios": ratios}, md)
    plot(rows, RESULTS / f"{args.name}.png")
    print("wrote " + ", ".join(str(x) for x in [*paths, RESULTS / f"{args.name}.png"]))


if __name__ == "__main__":
    main()
