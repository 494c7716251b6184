"""HRMLM speed: the fast recurrence against the plain per-token loop, measured in one run.

Configuration of the seed project's "reduced" recipe: n_embd 256, n_hidden 512, n_high_hidden 256,
T 3, N 2, vocabulary 49152, batch 4 x 256 tokens, fp32, random weights and tokens (speed does not
depend on them).

- ``naive``: the formulas as a per-token loop (tests/hrmlm_reference.py): every cell input
  concatenated, every gate a separate product, the vocabulary projection inside the loop,
  autograd for the backward pass — the structure of the public HRMLM code;
- ``hiermem``: ``HRMLM.forward`` (embedding product for all tokens at once, h_h products once per
  high-level cycle and fused, vocabulary projection after the loop, hand-written backward).

Measured: training (forward, backward, AdamW step) and reading (scoring every token, no grad) in
tokens/s; greedy generation of new tokens (batch 1) in tokens/s, the naive loop feeding one token
at a time with its state as the public code does, hiermem through ``hiermem.inference.generate``.
Each figure is the median of ``--repeats`` timings, naive and hiermem interleaved so that both
see the same machine load. Then hiermem alone at batch 32, and its training cost as T and N grow.
The public code's own figures on a 2-core CPU (about 30 tok/s training, 90 tok/s reading) are
quoted in the output for reference, never divided by.

    python benchmarks/bench_hrmlm.py              # about 10 minutes on 2 cores
    python benchmarks/bench_hrmlm.py --quick      # shorter sequences, one repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from common import lm_read, lm_train_step, machine, markdown_table, print_header, write_results  # noqa: E402
from hrmlm_reference import naive_forward  # noqa: E402

from hiermem.inference.generate import GenerationConfig, generate  # noqa: E402
from hiermem.models.hrmlm import HRMLM, HRMLMConfig  # noqa: E402

REDUCED = dict(vocab_size=49152, n_embd=256, n_hidden=512, n_high_hidden=256, T=3, N=2)
PUBLIC = {"train_tok_s": 30.0, "read_tok_s": 90.0}


def build(**changes) -> HRMLM:
    torch.manual_seed(0)
    return HRMLM(HRMLMConfig(**{**REDUCED, **changes}))


def train_step(model, opt, ids, naive: bool) -> None:
    lm_train_step(model, opt, ids, naive_forward if naive else None)


def read(model, ids, naive: bool) -> None:
    lm_read(model, ids, naive_forward if naive else None)


@torch.no_grad()
def gen(model, prompt, n: int, naive: bool) -> None:
    if naive:  # the prompt through the loop, then one token at a time with the carried state
        logits, _, _, (low, high) = naive_forward(model, prompt)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n - 1):
            logits, _, _, (low, high) = naive_forward(model, nxt, low, high)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
    else:
        generate(model, prompt, GenerationConfig(max_new_tokens=n, eos_token_id=[]))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(model, args) -> dict:
    """Naive vs hiermem, interleaved, median of args.repeats: training, reading, generation."""
    B, L = args.batch, args.length
    ids = torch.randint(0, REDUCED["vocab_size"], (B, L), generator=torch.Generator().manual_seed(1))
    prompt = ids[:1, :16]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = {}
    for name, work, tokens in (("train", lambda nv: train_step(model, opt, ids, nv), B * L),
                               ("read", lambda nv: read(model, ids, nv), B * L),
                               ("generate", lambda nv: gen(model, prompt, args.new_tokens, nv), args.new_tokens)):
        model.train(name == "train")
        for naive in (True, False):
            work(naive)  # warm-up
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for naive in (True, False):
                times[naive].append(timed(lambda: work(naive)))
        naive_s, fast_s = statistics.median(times[True]), statistics.median(times[False])
        out[name] = {"naive_tok_s": round(tokens / naive_s, 1), "hiermem_tok_s": round(tokens / fast_s, 1),
                     "speedup": round(naive_s / fast_s, 1), "tokens": tokens}
        print(f"{name:9s} naive {tokens / naive_s:8.1f} tok/s   hiermem {tokens / fast_s:9.1f} tok/s   "
              f"x{naive_s / fast_s:.1f}", flush=True)
    return out


def fast_only(model, B: int, L: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    train_step(model, opt, ids, False)
    train = statistics.median(timed(lambda: train_step(model, opt, ids, False)) for _ in range(repeats))
    model.eval()
    read(model, ids, False)
    rd = statistics.median(timed(lambda: read(model, ids, False)) for _ in range(repeats))
    return {"batch": B, "length": L, "train_tok_s": round(B * L / train, 1), "read_tok_s": round(B * L / rd, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="64-token sequences, one repeat")
    args = p.parse_args()
    if args.quick:
        args.length, args.repeats, args.new_tokens = 64, 1, 16
    torch.set_num_threads(args.threads)
    info = machine(torch.device("cpu"))
    print_header("HRMLM speed (reduced recipe, fp32, CPU)", info)
    model = build()
    results = {"machine": info, "config": REDUCED, "batch": args.batch, "length": args.length,
               "public_code_quoted": PUBLIC}
    results["compare"] = compare(model, args)
    results["batch32"] = fast_only(model, 32, args.length, args.repeats)
    print(f"batch 32: train {results['batch32']['train_tok_s']} tok/s, read {results['batch32']['read_tok_s']} tok/s")
    scaling = []
    for T, N in ((1, 1), (3, 1), (3, 2), (5, 3), (7, 4)):
        r = fast_only(build(T=T, N=N), args.batch, min(args.length, 64), max(1, args.repeats - 1))
        scaling.append({"T": T, "N": N, "cell_steps": N * (T + 1), **r})
        print(f"T={T} N={N}: {N * (T + 1)} cell steps/token, train {r['train_tok_s']} tok/s, read {r['read_tok_s']}")
    results["scaling"] = scaling
    c = results["compare"]
    md = [f"# HRMLM speed\n\n`{info['command']}` on {info['cpu']} ({info['cores']} cores, "
          f"{info['torch_threads']} threads), torch {info['torch']}, load average {info['load_average']}.\n",
          f"Reduced recipe (n_embd 256, n_hidden 512, n_high_hidden 256, T 3, N 2, vocabulary 49152), fp32, "
          f"batch {args.batch} x {args.length} tokens; generation: batch 1, {args.new_tokens} new tokens after a "
          f"16-token prompt. Median of {args.repeats}, naive and hiermem interleaved.\n",
          markdown_table(["work", "naive loop tok/s", "hiermem tok/s", "speed-up"],
                         [[k, v["naive_tok_s"], v["hiermem_tok_s"], f"{v['speedup']}x"] for k, v in c.items()]),
          f"\nThe public code's own figures on a 2-core CPU, quoted: {PUBLIC['train_tok_s']:.0f} tok/s training, "
          f"{PUBLIC['read_tok_s']:.0f} tok/s reading.\n",
          f"\nhiermem at batch 32 x {args.length}: training {results['batch32']['train_tok_s']} tok/s, reading "
          f"{results['batch32']['read_tok_s']} tok/s.\n\nCost as T and N grow (batch {args.batch}, 64 tokens):\n",
          markdown_table(["T", "N", "cell steps / token", "train tok/s", "read tok/s"],
                         [[s["T"], s["N"], s["cell_steps"], s["train_tok_s"], s["read_tok_s"]] for s in scaling])]
    for path in write_results("hrmlm_speed", results, "\n".join(md) + "\n"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
