"""HMT training throughput in supervised tokens per second (every token of every segment in the loss).

Configuration of DESIGN.md's table: bundled SmolLM2-135M (fp32), frozen backbone, HMT with segment
222 + sensory 32 + 2 memory positions, N=300, batch 1, 2 threads, windows of 2 and 4 segments
(444 / 888 tokens). Each configuration runs in a fresh process.

- ``trainer``: ``hiermem.training.Trainer`` (AdamW on the memory parameters, gradient clipping,
  token-weighted loss) over ``hiermem.data.WindowLoader`` windows of the Shakespeare train split;
- ``manual``: the bare step, ``model(ids, labels=ids).loss.backward()`` + AdamW, as a reference.

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --segments 2 --steps 3 --loops manual   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RssPeak, benchmark_tokens, machine, markdown_table, pick_device,  # noqa: E402
                    print_header, run_worker, sync, write_results)

# the public code's configuration: 256 backbone positions per segment = 222 + 32 sensory + 2 memory, no BOS
HMT_CONFIG = dict(segment_length=222, sensory_length=32, cache_size=300, stage=2, eviction="fifo", segment_bos=False)
LOOPS = ("trainer", "manual")


def manual_steps(model, windows: list[torch.Tensor], device) -> tuple[float, int]:
    """Seconds and supervised tokens of plain training steps over ``windows`` (each (1, T))."""
    params = [p for n, p in model.named_parameters() if n in set(model.trainable_names())]
    opt = torch.optim.AdamW(params, lr=1e-4)
    seconds, tokens = 0.0, 0
    for ids in windows:
        start = time.perf_counter()
        out = model(ids.to(device), labels=ids.to(device), return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        seconds += time.perf_counter() - start
        tokens += out.num_tokens
    return seconds, tokens


def trainer_steps(model, backbone, window: int, steps: int):
    """(seconds, supervised tokens) of ``steps`` Trainer steps after one warm-up step."""
    from hiermem.data import WindowLoader, build_corpus
    from hiermem.training import TrainConfig, Trainer

    corpus = build_corpus("shakespeare", backbone.tokenizer, split="train")
    loader = WindowLoader(corpus, window_tokens=window, batch_size=1, seed=0)
    cfg = TrainConfig(steps=1, lr=1e-4, warmup=0, precision="fp32", trainable="memory", eval_every=0,
                      save_every=0, tensorboard=False, progress=False, log_every=1000)
    trainer = Trainer(model, cfg, loader)
    trainer.fit()  # warm-up step
    warm_tokens = trainer.tokens
    trainer.cfg = dataclasses.replace(cfg, steps=1 + steps)
    res = trainer.fit()  # the trainer's own clock covers these steps only
    tokens = res.tokens - warm_tokens
    return tokens / res.tokens_per_second, tokens


def worker(args) -> None:
    from hiermem.backbones import DEFAULT_BACKBONE, load_backbone
    from hiermem.models.hmt import HMT, HMTConfig

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    backbone = load_backbone(DEFAULT_BACKBONE, device=device, dtype=args.dtype)
    model = HMT(backbone.model, HMTConfig(**HMT_CONFIG), bos_token_id=backbone.tokenizer.bos_token_id).train()
    window = args.segments * HMT_CONFIG["segment_length"]
    gc.collect()
    with RssPeak(device) as mem:
        if args.loop == "trainer":
            seconds, tokens = trainer_steps(model, backbone, window, args.steps)
        else:
            ids = benchmark_tokens(backbone.tokenizer, window * (args.steps + 1), split="train")
            windows = list(ids.view(-1, 1, window))  # (steps + 1) x (1, window)
            manual_steps(model, windows[:1], device)  # warm-up
            seconds, tokens = manual_steps(model, windows[1:], device)
    print(json.dumps({"loop": args.loop, "segments": args.segments, "steps": args.steps,
                      "step_s": round(seconds / args.steps, 2), "supervised_tok_s": round(tokens / seconds, 1),
                      "supervised_tokens_per_step": tokens // args.steps, **mem.report()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=LOOPS, help="(worker) trainer or manual")
    p.add_argument("--segments", nargs="*", type=int, default=[2, 4], help="segments per training window")
    p.add_argument("--loops", nargs="*", default=list(LOOPS), choices=LOOPS)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    if not args.segments or min(args.segments) < 1:
        p.error(f"--segments takes one or more numbers >= 1, got {args.segments}")
    if args.worker:
        args.segments = args.segments[0]
        return worker(args)
    torch.set_num_threads(args.threads)
    info = machine(pick_device(args.device))
    print_header("HMT training benchmark", info)
    rows, lines = [], []
    for seg in args.segments:
        for loop in args.loops:
            extra = ["--device", args.device] if args.device else []
            res = run_worker(Path(__file__), ["--loop", loop, "--segments", str(seg), "--steps", str(args.steps),
                                              "--threads", str(args.threads), "--dtype", args.dtype, *extra],
                             args.timeout)
            row = {"loop": loop, "segments": seg, **res}
            if "supervised_tok_s" in res:
                lines.append(f"{seg} segments, {loop}: {res['supervised_tok_s']:.0f} supervised tok/s "
                             f"({res['step_s']:.1f} s/step)")
            rows.append(row)
            print(lines[-1] if "supervised_tok_s" in res else f"{seg} segments, {loop}: {res['error']}", flush=True)
    table = markdown_table(
        ["loop", "segments", "supervised tok/s", "s/step", "RSS growth (MB)"],
        [[r["loop"], r["segments"], r.get("supervised_tok_s", r.get("error")), r.get("step_s", "-"),
          r.get("rss_growth_mb", "-")] for r in rows])
    md = (f"# Training throughput: HMT, frozen backbone\n\n`{info['command']}`\n\nMachine: {info['cpu']}, "
          f"{info['cores']} cores, {info['torch_threads']} torch threads, {info.get('gpu', info['device'])}; torch "
          f"{info['torch']}. Load average at start: {info['load_average']}.\n\nHMT: {HMT_CONFIG}; batch 1; loss on "
          "every token of every segment.\n\n" + table + "\n" + "\n".join(f"- {ln}" for ln in lines) + "\n")
    paths = write_results("training", {"machine": info, "hmt_config": HMT_CONFIG, "rows": rows}, md)
    print("wrote " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
