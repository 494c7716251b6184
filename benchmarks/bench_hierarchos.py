"""Hierarchos speed: the fast recurrence against the naive per-token loop, measured in one run.

Configuration: the seed project's defaults with ``context_dim`` 448 (``h_hidden`` = ``l_hidden``
= 448, as the seed ties both cell widths to ``context_dim``), persistent_dim 128, 1024 LTM slots of
128-wide keys and values, top-4 reads, h_stride 4, max_h_steps 5, max_l_steps 5, l_conv_atol 1e-4,
h_halt_thresh 0.9, ltm_lr 0.01, a GPT-2-sized vocabulary (50257), fp32, random weights and tokens.

- ``naive``: tests/hierarchos_reference.py: the formulas as a loop over rows and tokens, every
  projection on its concatenated input, the whole memory (S x V) decayed and updated every token,
  the vocabulary projection inside the loop, autograd for the backward pass;
- ``hiermem``: ``Hierarchos.forward`` / its decoder.

Measured at batch 1 and 8: training (forward, backward, AdamW step), reading (every token scored,
no grad) and decoding (greedy, the decoder fed one token at a time; the memory's surprise update
runs on every token, as in every mode) in tokens/s; the naive loop on fewer tokens
(``--naive-tokens``), interleaved with hiermem so both see the same load. Then the peak RSS of a
training step in a fresh process and the state's bytes after 256 and 4096 tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_hierarchos.py            # about 15 minutes on a loaded 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_hierarchos.py --quick    # shorter runs, one repeat
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from common import (RssPeak, lm_read, lm_train_step, machine, markdown_table, print_header, run_worker,  # noqa: E402
                    write_results)
from hierarchos_reference import naive_forward  # noqa: E402

from hiermem.inference.generate import GenerationConfig, generate  # noqa: E402
from hiermem.models.hierarchos import Hierarchos, HierarchosConfig, HierarchosState  # noqa: E402

SEED = dict(vocab_size=50257, context_dim=448, h_hidden=448, l_hidden=448)  # the rest: HierarchosConfig defaults
TARGETS = {"train_tok_s": 100.0, "read_tok_s": 200.0, "decode_tok_s": 50.0, "train_rss_mb": 2048.0, "speedup": 10.0}


def build() -> Hierarchos:
    torch.manual_seed(0)
    return Hierarchos(HierarchosConfig(**SEED))


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SEED["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def naive_state(model, start: HierarchosState, finals: list[dict], n: int) -> HierarchosState:
    """The naive loop's final values (dense memory) as a HierarchosState ``n`` tokens after ``start``."""
    c = model.config
    clock = start.clock + n
    stamp = torch.tensor([f["stamp"] for f in finals], dtype=torch.long)
    age = (clock[:, None] - 1 - stamp).double()[..., None]  # the lazy layout stores values as of their write

    def lazy(dense, rate):
        decay = torch.pow(rate, age)
        return torch.where(decay > 0, dense.double() / decay, 0.0).to(dense.dtype)

    fast = torch.stack([f["fast"] for f in finals])
    mom = torch.stack([f["mom"] for f in finals])
    return HierarchosState(
        manager=torch.stack([f["manager"] for f in finals]), worker=torch.stack([f["worker"] for f in finals]),
        worker_out=torch.stack([f["worker_out"] for f in finals]),
        prev_context=torch.stack([f["prev_context"] for f in finals]),
        target_context=torch.stack([f["target_context"] for f in finals]),
        ltm_fast=lazy(fast, 1.0 - c.ltm_forget), ltm_mom=lazy(mom, c.ltm_momentum), ltm_time=stamp, clock=clock,
        tokens=start.tokens + n)


def train_step(model, opt, ids, naive: bool) -> None:
    lm_train_step(model, opt, ids, naive_forward if naive else None)


def read(model, ids, naive: bool) -> None:
    lm_read(model, ids, naive_forward if naive else None)


@torch.no_grad()
def decode(model, prompt, n: int, naive: bool) -> None:
    """Greedy: the prompt read, then ``n`` new tokens fed back one at a time with the carried state."""
    if not naive:
        generate(model, prompt, GenerationConfig(max_new_tokens=n, eos_token_id=[]))
        return
    state = model.init_state(prompt.shape[0])
    x = prompt
    for _ in range(n):
        logits, finals, _ = naive_forward(model, x, state)
        state = naive_state(model, state, finals, x.shape[1])
        x = logits[:, -1].argmax(-1, keepdim=True)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(model, B: int, args) -> dict:
    """Naive vs hiermem at batch B, interleaved, median of args.repeats."""
    fast_ids, naive_ids = tokens(B, args.length), tokens(B, args.naive_tokens)
    prompt = tokens(B, 16, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = {}
    work = {"train": (lambda nv: train_step(model, opt, naive_ids if nv else fast_ids, nv)),
            "read": (lambda nv: read(model, naive_ids if nv else fast_ids, nv)),
            "decode": (lambda nv: decode(model, prompt, args.naive_new if nv else args.new_tokens, nv))}
    counts = {"train": (B * args.naive_tokens, B * args.length), "read": (B * args.naive_tokens, B * args.length),
              "decode": (B * args.naive_new, B * args.new_tokens)}
    for name, fn in work.items():
        model.train(name == "train")
        warm = tokens(B, 8, seed=4)  # a short warm-up of each path
        if name == "train":
            train_step(model, opt, warm, False), train_step(model, opt, warm[:, :4], True)
        else:
            read(model, warm, False), read(model, warm[:, :4], True)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for naive in (True, False):
                times[naive].append(timed(lambda: fn(naive)))
        n_tok, f_tok = counts[name]
        naive_rate = n_tok / statistics.median(times[True])
        fast_rate = f_tok / statistics.median(times[False])
        out[name] = {"naive_tok_s": round(naive_rate, 2), "hiermem_tok_s": round(fast_rate, 1),
                     "speedup": round(fast_rate / naive_rate, 1), "naive_tokens": n_tok, "hiermem_tokens": f_tok}
        print(f"batch {B} {name:7s} naive {naive_rate:8.2f} tok/s   hiermem {fast_rate:8.1f} tok/s   "
              f"x{fast_rate / naive_rate:.1f}", flush=True)
    model.eval()
    return out


@torch.no_grad()
def dynamics(model, B: int, L: int) -> dict:
    """Mean manager pondering and worker refinement steps on the benchmark's tokens (they set the cost)."""
    tr = model(tokens(B, L), return_logits=False, return_trace=True).trace
    plan = tr["plan"]
    return {"h_steps_per_plan": round(float(tr["h_steps"][plan].float().mean()), 2),
            "l_steps": round(float(tr["l_steps"].float().mean()), 2)}


@torch.no_grad()
def state_growth(model, total: int, chunk: int) -> dict:
    """State bytes after ``chunk`` and after ``total`` tokens read at batch 1 (chunks carry the state)."""
    state, sizes = None, {}
    with RssPeak() as rss:
        for i in range(total // chunk):
            state = model(tokens(1, chunk, seed=10 + i), state=state, return_logits=False).state
            if (i + 1) * chunk in (chunk, total):
                sizes[(i + 1) * chunk] = state.nbytes
    return {"state_bytes": {str(k): v for k, v in sizes.items()}, "rss_growth_mb": round(rss.growth_mb, 1),
            "slots_written": int((state.ltm_time >= 0).sum())}


def worker(args) -> None:
    """One training step at batch args.batch in this fresh process: peak RSS (weights, AdamW, activations)."""
    torch.set_num_threads(args.threads)
    model = build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = tokens(args.batch, args.length)
    with RssPeak() as rss:
        for _ in range(2):  # the second step holds AdamW's moments too
            train_step(model, opt, ids, False)
    print(json.dumps({"batch": args.batch, "length": args.length, **rss.report()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--naive-tokens", type=int, default=32, help="tokens per row for the naive loop")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--naive-new", type=int, default=16)
    p.add_argument("--state-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="64 tokens, one repeat, 1024-token state check")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.length, args.repeats, args.naive_tokens, args.new_tokens, args.naive_new = 64, 1, 8, 16, 4
        args.state_tokens = 1024
    torch.set_num_threads(args.threads)
    info = machine(torch.device("cpu"))
    print_header("Hierarchos speed (seed defaults, context_dim 448, fp32, CPU)", info)
    model = build()
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in ("tokenizer",)}
    n_params = sum(p.numel() for p in model.parameters())
    results = {"machine": info, "config": config, "parameters": n_params, "length": args.length,
               "targets": TARGETS, "batches": {}}
    for B in args.batches:
        results["batches"][str(B)] = {"compare": compare(model, B, args), "dynamics": dynamics(model, B, 32)}
    for B in args.batches:
        r = run_worker(Path(__file__), ["--batch", str(B), "--length", str(args.length),
                                        "--threads", str(args.threads)], timeout=1800)
        results["batches"][str(B)]["train_rss"] = r
        print(f"batch {B} training step: peak RSS {r.get('rss_peak_mb')} MB", flush=True)
    results["state"] = state_growth(model.eval(), args.state_tokens, 256 if args.state_tokens >= 512 else 64)
    print(f"state bytes {results['state']['state_bytes']}", flush=True)
    for path in write_results("hierarchos_speed", results, report(results, args)):
        print(f"wrote {path}")


def report(res: dict, args) -> str:
    info, t = res["machine"], res["targets"]
    rows, extra = [], []
    for B, r in res["batches"].items():
        for name, v in r["compare"].items():
            rows.append([B, name, v["naive_tok_s"], v["hiermem_tok_s"], f"{v['speedup']}x"])
        rss = r["train_rss"].get("rss_peak_mb", r["train_rss"].get("error"))
        d = r["dynamics"]
        extra.append([B, rss, d["h_steps_per_plan"], d["l_steps"]])
    sizes = res["state"]["state_bytes"]
    first, last = sorted(sizes, key=int)[0], sorted(sizes, key=int)[-1]
    b1 = res["batches"].get("1", {}).get("compare")
    check = ""
    if b1:
        def mark(ok):
            return "met" if ok else "missed"
        rss1 = res["batches"]["1"]["train_rss"].get("rss_peak_mb", float("inf"))
        check = ("\nTargets at batch 1 x 256: training >= {:.0f} tok/s: {} ({}); reading >= {:.0f}: {} ({}); "
                 "decoding >= {:.0f}: {} ({}); training RSS <= {:.0f} MB: {} ({}); >= {:.0f}x the naive loop: "
                 "training {}x, reading {}x, decoding {}x.\n").format(
            t["train_tok_s"], b1["train"]["hiermem_tok_s"], mark(b1["train"]["hiermem_tok_s"] >= t["train_tok_s"]),
            t["read_tok_s"], b1["read"]["hiermem_tok_s"], mark(b1["read"]["hiermem_tok_s"] >= t["read_tok_s"]),
            t["decode_tok_s"], b1["decode"]["hiermem_tok_s"], mark(b1["decode"]["hiermem_tok_s"] >= t["decode_tok_s"]),
            t["train_rss_mb"], rss1, mark(rss1 <= t["train_rss_mb"]), t["speedup"],
            b1["train"]["speedup"], b1["read"]["speedup"], b1["decode"]["speedup"])
    md = [f"# Hierarchos speed\n\n`OMP_NUM_THREADS=1 {info['command']}` on {info['cpu']} ({info['cores']} cores, "
          f"{info['torch_threads']} torch thread), torch {info['torch']}, load average {info['load_average']} "
          f"(a shared machine: ratios within this run are what counts).\n",
          f"Seed defaults with context_dim 448 (h_hidden = l_hidden = 448, persistent 128, 1024 LTM slots, keys and "
          f"values 128, top-4, h_stride 4, max_h_steps 5, max_l_steps 5, l_conv_atol 1e-4, ltm_lr 0.01), vocabulary "
          f"50257, {res['parameters'] / 1e6:.1f}M parameters, fp32, random weights and tokens. hiermem: "
          f"{args.length} tokens per row (training, reading), {args.new_tokens} new tokens (decoding, after a "
          f"16-token prompt); naive loop: {args.naive_tokens} tokens per row, {args.naive_new} new tokens. "
          f"Median of {args.repeats}, naive and hiermem interleaved; the surprise update of the memory runs on "
          f"every token in all three.\n",
          markdown_table(["batch", "work", "naive loop tok/s", "hiermem tok/s", "speed-up"], rows), check,
          "\nPeak RSS of a training step (fresh process: weights, AdamW moments, activations of the whole "
          "window) and the mean reasoning steps on these random weights (they set the cost per token):\n",
          markdown_table(["batch", "training peak RSS MB", "manager steps per plan", "worker steps per token"],
                         extra),
          f"\nState of one row after {first} tokens: {sizes[first]:,} bytes; after {last} tokens: "
          f"{sizes[last]:,} bytes ({res['state']['slots_written']} of 1024 slots written; RSS growth while "
          f"reading {last} tokens: {res['state']['rss_growth_mb']} MB).\n"]
    return "\n".join(md)


if __name__ == "__main__":
    main()
