"""HMST episodic-memory scan: the chunked parallel scan against the sequential per-token loop.

The recurrence of one SSM layer of the hmst-micro preset (8 heads of 64 channels, state size 16),
S_t = exp(Δ_t A) S_{t-1} + (Δ_t x_t) B_t^T, y_t = S_t C_t, over 1,024 tokens, fp32, random inputs:

- ``sequential``: tests/hmst_reference.py ``sequential_scan``, one step per token (the loop of the
  seed project's episodic memory);
- ``parallel``: ``hiermem.models.hmst.chunked_scan`` (matmuls within chunks, the state carried across
  chunks) at several chunk lengths.

Measured: forward (no autograd) and forward + backward, milliseconds per call, median of
``--repeats``, the two interleaved so that both see the same machine load. Before timing, the two
are checked equal in float64 (values and gradients).

    OMP_NUM_THREADS=1 python benchmarks/bench_hmst_scan.py        # about 2 minutes
    python benchmarks/bench_hmst_scan.py --quick                   # one repeat, fewer settings
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from common import machine, markdown_table, print_header, write_results  # noqa: E402
from hmst_reference import sequential_scan  # noqa: E402

from hiermem.models.hmst import HMSTConfig, chunked_scan  # noqa: E402


NOTE = """The project's target was 50x at 1k tokens; on one CPU thread it is not reached. The loop is
already vectorised over (batch, heads, channels, state): each step is a few element-wise ops on a
(B, 8, 64, 16) state, and the chunked form does work of the same order as matmuls (chunk states and
their read-out are B * T * H * P * N multiply-adds each, the within-chunk part grows with the chunk).
What it removes is the ~7 operator dispatches per token and, in training, the per-token autograd
tape: hence the table: a few x forward and 10-20x forward + backward, little forward gain at batch 8,
where the loop's per-step ops are large enough to run at full speed. On an accelerator, where every
per-token op is a kernel launch, the ratio is expected to be larger; that is not measured here.
"""


def inputs(B: int, T: int, H: int, P: int, N: int, dtype=torch.float32, grad: bool = False, seed: int = 0):
    """Scan inputs as the SSM layer makes them: u = Δ x, log decays Δ A (A in [-16, -1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g, dtype=dtype)
    step = F.softplus(torch.randn(B, T, H, generator=g, dtype=dtype) - 3)
    A = -torch.empty(H, dtype=dtype).uniform_(1, 16, generator=g)
    b, c = torch.randn(B, T, N, generator=g, dtype=dtype), torch.randn(B, T, N, generator=g, dtype=dtype)
    args = [x * step[..., None], step * A, b, c, torch.zeros(B, H, P, N, dtype=dtype)]
    return [a.requires_grad_(grad) for a in args]


def check_equal(H: int, P: int, N: int) -> dict:
    """Max differences between the two in float64 over 300 tokens (values and input gradients)."""
    args = inputs(2, 300, H, P, N, torch.float64, grad=True, seed=1)
    y1, s1 = chunked_scan(*args, chunk=64)
    y2, s2 = sequential_scan(*args)
    g1 = torch.autograd.grad(y1.square().sum() + s1.sum(), args)
    g2 = torch.autograd.grad(y2.square().sum() + s2.sum(), args)
    return {"values": max(float((y1 - y2).abs().max().detach()), float((s1 - s2).abs().max().detach())),
            "gradients": max(float((a - b).abs().max()) for a, b in zip(g1, g2))}


def timed(fn, args, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        y, s = fn(*args)
        (y.square().mean() + s.square().mean()).backward()
    else:
        with torch.no_grad():
            fn(*args)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    cfg = HMSTConfig.preset("micro")
    H, P, N = cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_state_size
    repeats = 1 if a.quick else a.repeats
    chunks = [64] if a.quick else [16, 32, 64, 128]
    batches = [1] if a.quick else [1, 8]
    info = machine(torch.device("cpu"))
    print_header("HMST scan: chunked parallel vs sequential", info)
    eq = check_equal(H, P, N)
    print(f"float64 max |difference|: values {eq['values']:.2e}, gradients {eq['gradients']:.2e}")
    rows, results = [], []
    for B in batches:
        for backward in (False, True):
            work = "forward + backward" if backward else "forward"
            seq, par = [], {L: [] for L in chunks}
            for r in range(repeats + 1):  # the first round warms up and is dropped
                args = inputs(B, a.tokens, H, P, N, grad=backward)
                t = timed(sequential_scan, args, backward)
                if r:
                    seq.append(t)
                for L in chunks:
                    args = inputs(B, a.tokens, H, P, N, grad=backward)
                    t = timed(lambda *x, L=L: chunked_scan(*x, chunk=L), args, backward)
                    if r:
                        par[L].append(t)
            s = statistics.median(seq)
            for L in chunks:
                p = statistics.median(par[L])
                results.append({"batch": B, "tokens": a.tokens, "work": work, "chunk": L, "sequential_ms": round(s, 2),
                                "parallel_ms": round(p, 2), "speedup": round(s / p, 1)})
                rows.append([B, work, L, s, p, f"{s / p:.1f}x"])
                print(f"batch {B}, {work}, chunk {L}: sequential {s:.1f} ms, parallel {p:.2f} ms, {s / p:.1f}x")
    best = {w: max(r["speedup"] for r in results if r["work"] == w) for w in ("forward", "forward + backward")}
    at_default = {w: next(r["speedup"] for r in results if r["work"] == w and r["chunk"] == cfg.ssm_chunk
                          and r["batch"] == 1) for w in best}
    md = (f"# HMST scan: chunked parallel vs sequential\n\n`{info['command']}` on {info['cpu']} "
          f"({info['cores']} cores, {info['torch_threads']} torch threads), torch {info['torch']}, load average "
          f"{info['load_average']}.\n\nOne SSM layer of hmst-micro ({H} heads x {P} channels, state size {N}), "
          f"{a.tokens} tokens, fp32; median of {repeats}, interleaved. float64 agreement: values "
          f"{eq['values']:.1e}, gradients {eq['gradients']:.1e} (max absolute difference).\n\n"
          + markdown_table(["batch", "work", "chunk", "sequential ms", "parallel ms", "speed-up"], rows)
          + f"\nAt the default chunk ({cfg.ssm_chunk}), batch 1: {at_default['forward']}x forward, "
          f"{at_default['forward + backward']}x forward + backward. Best: {best['forward']}x forward, "
          f"{best['forward + backward']}x forward + backward.\n\n" + NOTE)
    data = {"machine": info, "config": {"heads": H, "head_dim": P, "state_size": N, "tokens": a.tokens,
                                        "repeats": repeats, "default_chunk": cfg.ssm_chunk},
            "float64_max_difference": eq, "results": results, "best_speedup": best,
            "speedup_at_default_chunk_batch_1": at_default}
    for path in write_results("hmst_scan", data, md):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
