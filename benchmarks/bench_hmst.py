"""HMST speed: hiermem against the naive per-token loop, and MoE against a dense model of equal
active parameters, measured in one run.

Presets ``micro`` (d 256, 4 layers, 8 experts top-2, vocabulary 4096) and ``tiny`` (d 512, 8
layers, 8 experts top-2, vocabulary 32000), built with ``expert_bias`` so that the expert-bias gate
does its work; fp32, random weights and tokens (speed does not depend on them), batch 2 x 256.

- ``naive``: tests/hmst_reference.py ``naive_forward``: attention one query and one head at a time
  over its rotated window, the convolution from its definition, the scan one token at a time, every
  token through its top-k experts one by one, autograd for the backward pass. It is run on fewer
  tokens (``NAIVE_TOKENS``); its cost per token grows with the part of the window already filled,
  so a shorter run flatters it and the ratios are lower bounds;
- ``hiermem``: ``HMST.forward`` (blocked window attention, chunked parallel scan, experts grouped);
- ``dense``: the same config with num_experts 1, top_k 1 and intermediate_size top_k * the MoE's,
  so that one token uses as many FFN parameters as in the MoE (``param_count(active=True)``).

Measured: training (forward, backward, AdamW step) and reading (every token scored, no grad) in
tokens/s, the three contestants interleaved, median of ``--repeats``; decoding (batch 1, a
16-token prompt then 32 greedy tokens, one ``model(token, state=...)`` call per token) with all
gates on (``expert_bias=True``, SSM on, no early exit: the full work), with an early exit after
half the layers and with the SSM skipped, interleaved. The reference has no state, so it has no
decoder to compare. The public code's own figures on a 2-core CPU are quoted next to the measured
ones, never measured here; the ratio against the naive loop of this run is the primary figure.

    OMP_NUM_THREADS=1 python benchmarks/bench_hmst.py               # about 10 minutes on one thread
    OMP_NUM_THREADS=1 python benchmarks/bench_hmst.py --quick       # shorter runs, one repeat
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
from common import lm_read, lm_train_step, machine, markdown_table, print_header, write_results  # noqa: E402
from hmst_reference import naive_forward  # noqa: E402

from hiermem.models.hmst import HMST, HMSTConfig  # noqa: E402

# The public code's figures (2-core CPU, fp32, batch 2 x 256); its tiny has 4 experts top-2 (87M).
QUOTED = {"micro": {"train": 86.0, "read": 771.0, "decode": 9.4}, "tiny": {"train": 39.0, "read": 106.0}}
TARGETS = {"train": 5.0, "read": 3.0, "decode": 5.0}  # x the quoted figures
NAIVE_TOKENS = {"micro": {"train": 64, "read": 256}, "tiny": {"train": 32, "read": 64}}  # per row


def build(preset: str, dense: bool = False) -> HMST:
    torch.manual_seed(0)
    c = HMSTConfig.preset(preset, expert_bias=True)
    if dense:
        c = HMSTConfig.preset(preset, expert_bias=True, num_experts=1, top_k=1,
                              intermediate_size=c.top_k * c.ffn_size)
    return HMST(c)


def tokens(vocab: int, b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(model, prompt, n: int, **gates) -> dict:
    """The prompt read, then ``n`` greedy tokens fed back one call each with the state -> out.compute."""
    out = model(prompt, return_logits=False, **gates)
    for _ in range(n):
        out = model(out.last_logits.argmax(-1, keepdim=True), state=out.state, return_logits=False, **gates)
    return out.compute


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(work: dict, repeats: int) -> dict:
    """name -> median seconds of ``work[name]()``, the names taking turns in every repeat."""
    times = {k: [] for k in work}
    for _ in range(repeats):
        for k, fn in work.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def train_and_read(preset: str, args) -> dict:
    """Naive loop, hiermem (MoE) and the dense model: training, then reading, interleaved."""
    moe, dense = build(preset), build(preset, dense=True)
    V, B, L = moe.config.vocab_size, args.batch, args.length
    ids = tokens(V, B, L)
    n_tok = {w: min(L, t) for w, t in NAIVE_TOKENS[preset].items()}
    if args.quick:
        n_tok = {w: max(8, t // 4) for w, t in n_tok.items()}
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (moe, dense)}
    naive = lambda mod, x: naive_forward(mod, x)  # noqa: E731
    out = {}
    for name in ("train", "read"):
        for m in (moe, dense):
            m.train(name == "train")
        n_ids = ids[:, :n_tok[name]]
        if name == "train":
            work = {"naive": lambda: lm_train_step(moe, opts[moe], n_ids, naive),
                    "hiermem": lambda: lm_train_step(moe, opts[moe], ids),
                    "dense": lambda: lm_train_step(dense, opts[dense], ids)}
            lm_train_step(moe, opts[moe], ids[:, :4], naive)  # warm-ups
        else:
            work = {"naive": lambda: lm_read(moe, n_ids, naive), "hiermem": lambda: lm_read(moe, ids),
                    "dense": lambda: lm_read(dense, ids)}
            lm_read(moe, ids[:, :4], naive)
        work["hiermem"](), work["dense"]()
        sec = interleaved(work, args.repeats)
        rates = {"naive": B * n_tok[name] / sec["naive"], "hiermem": B * L / sec["hiermem"],
                 "dense": B * L / sec["dense"]}
        out[name] = {"naive_tokens": B * n_tok[name], "hiermem_tokens": B * L,
                     **{f"{k}_tok_s": round(v, 2 if k == "naive" else 1) for k, v in rates.items()},
                     "hiermem_over_naive": round(rates["hiermem"] / rates["naive"], 1),
                     "moe_over_dense": round(rates["hiermem"] / rates["dense"], 2)}
        print(f"{preset:5s} {name:5s} naive {rates['naive']:7.2f} tok/s ({B}x{n_tok[name]})   hiermem "
              f"{rates['hiermem']:7.1f}   x{rates['hiermem'] / rates['naive']:.1f}   dense {rates['dense']:7.1f}   "
              f"moe/dense {rates['hiermem'] / rates['dense']:.2f}", flush=True)
    for m in (moe, dense):
        m.eval()
    out["params"] = {k: {"total": m.config.param_count(), "active": m.config.param_count(active=True),
                         "ffn_active": m.config.num_layers * m.config.top_k * 3 * m.config.hidden_size
                         * m.config.ffn_size}
                     for k, m in (("moe", moe), ("dense", dense))}
    return out


def gated_decode(preset: str, args) -> dict:
    """Decoding with all gates on (full work), an early exit after half the layers, the SSM skipped."""
    model = build(preset).eval()
    c = model.config
    prompt = tokens(c.vocab_size, 1, 16, seed=3)
    variants = {"all gates on": dict(expert_bias=True),
                f"exit after {c.num_layers // 2} layers": dict(expert_bias=True, exit_layer=c.num_layers // 2),
                "SSM skipped": dict(expert_bias=True, skip_ssm=True)}
    compute = {k: decode(model, prompt, 4, **g) for k, g in variants.items()}  # warm-up; what each call runs
    sec = interleaved({k: (lambda g=g: decode(model, prompt, args.new_tokens, **g)) for k, g in variants.items()},
                      args.repeats)
    full = "all gates on"
    out = {}
    for k in variants:
        rate = args.new_tokens / sec[k]
        out[k] = {"tok_s": round(rate, 1), "layers": compute[k]["layers"], "ssm_blocks": compute[k]["ssm_blocks"],
                  "macs_per_token": compute[k]["flops_per_token"],
                  "time_vs_full": round(sec[k] / sec[full], 2),
                  "macs_vs_full": round(compute[k]["flops_per_token"] / compute[full]["flops_per_token"], 2)}
        print(f"{preset:5s} decode {k:22s} {rate:6.1f} tok/s   time x{out[k]['time_vs_full']:.2f}   "
              f"multiply-adds x{out[k]['macs_vs_full']:.2f}", flush=True)
    return out


def matmul_rate(repeats: int) -> float:
    """Multiply-adds per second of a (512, 512) x (512, 2048) fp32 product (expert-sized), median."""
    a, b = torch.randn(512, 512), torch.randn(2048, 512)
    F.linear(a, b)
    sec = statistics.median(timed(lambda: [F.linear(a, b) for _ in range(10)]) for _ in range(repeats))
    return 10 * 512 * 512 * 2048 / sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["micro", "tiny"], choices=["micro", "tiny"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="naive loop on a quarter of its tokens, one repeat")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    torch.set_num_threads(args.threads)
    info = machine(torch.device("cpu"))
    print_header("HMST speed (presets micro and tiny, fp32, CPU)", info)
    t0 = time.perf_counter()
    results = {"machine": info, "batch": args.batch, "length": args.length, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "public_code_quoted": QUOTED, "targets_x_quoted": TARGETS, "presets": {}}
    for preset in args.presets:
        r = train_and_read(preset, args)
        r["decode"] = gated_decode(preset, args)
        r["macs_per_token"] = HMSTConfig.preset(preset, expert_bias=True).macs_per_token()
        results["presets"][preset] = r
    rate = matmul_rate(args.repeats)
    results["matmul_macs_per_s"] = round(rate)
    results["seconds"] = round(time.perf_counter() - t0)
    print(f"expert-sized fp32 matmul: {2 * rate / 1e9:.1f} GFLOP/s; whole run {results['seconds']} s")
    name = "hmst_speed" if args.threads == 1 else f"hmst_speed-{args.threads}threads"
    for path in write_results(name, results, report(results, args)):
        print(f"wrote {path}")


def report(res: dict, args) -> str:
    info, rate = res["machine"], res["matmul_macs_per_s"]
    main_rows, moe_rows, gate_rows, checks, ceilings = [], [], [], [], []
    for preset, r in res["presets"].items():
        quoted = QUOTED[preset]
        full = r["decode"]["all gates on"]
        works = {"train": (r["train"]["naive_tok_s"], r["train"]["hiermem_tok_s"]),
                 "read": (r["read"]["naive_tok_s"], r["read"]["hiermem_tok_s"]), "decode": (None, full["tok_s"])}
        for work, (naive, fast) in works.items():
            n = r[work]["naive_tokens"] if work != "decode" else None
            q = quoted.get(work)
            ratio_q = fast / q if q else None
            if q:
                ok = ratio_q >= TARGETS[work]
                checks.append(f"{preset} {work} {fast:,.1f} tok/s = {ratio_q:.1f}x the quoted {q:g} "
                              f"(target {TARGETS[work]:g}x: {'met' if ok else 'missed'})")
            verdict = None if q is None else f">= {TARGETS[work]:g}x: {'met' if ratio_q >= TARGETS[work] else 'missed'}"
            main_rows.append([preset, work, "—" if naive is None else f"{naive:,.2f} ({n} tok)", fast,
                              "—" if naive is None else f"{fast / naive:.1f}x", "—" if q is None else f"{q:g}",
                              "—" if q is None else f"{ratio_q:.1f}x", verdict or "—"])
        pm = r["params"]
        for key, label in (("moe", f"MoE ({preset}: 8 experts, top-2)"), ("dense", "dense (1 expert, 2x wide)")):
            tok = "hiermem" if key == "moe" else "dense"
            moe_rows.append([label, f"{pm[key]['total'] / 1e6:.2f}M", f"{pm[key]['active'] / 1e6:.2f}M",
                             f"{pm[key]['ffn_active'] / 1e6:.2f}M", r["train"][f"{tok}_tok_s"],
                             r["read"][f"{tok}_tok_s"]])
        moe_rows.append([f"MoE / dense ({preset})", "", "", "", f"{r['train']['moe_over_dense']:.2f}x",
                         f"{r['read']['moe_over_dense']:.2f}x"])
        for k, v in r["decode"].items():
            gate_rows.append([preset, k, v["layers"], v["ssm_blocks"], v["tok_s"], f"{v['macs_vs_full']:.2f}",
                              f"{v['time_vs_full']:.2f}"])
        macs = r["macs_per_token"]
        ceilings.append(f"{preset}: {macs / 1e6:.1f}M multiply-adds per token forward (a full window), so at most "
                        f"{rate / (3 * macs):,.0f} tok/s training (forward + 2x backward) and {rate / macs:,.0f} "
                        f"tok/s reading if every one ran at that rate")
    md = [f"# HMST speed\n\n`OMP_NUM_THREADS={info['torch_threads']} {info['command']}` on {info['cpu']} "
          f"({info['cores']} cores, {info['torch_threads']} torch thread(s)), torch {info['torch']}, load average "
          f"{info['load_average']} (a shared machine: ratios within this run are what counts). Whole run "
          f"{res['seconds']} s.\n",
          f"Presets micro (d 256, 4 layers, 8 experts top-2, vocabulary 4096) and tiny (d 512, 8 layers, 8 experts "
          f"top-2, vocabulary 32000), built with the expert-bias gate, fp32, random weights and tokens. Training "
          f"(forward, backward, AdamW) and reading (no grad, loss) at batch {res['batch']} x {res['length']}; the "
          f"naive loop (tests/hmst_reference.py) on the tokens shown (batch {res['batch']}), fewer where 256 would "
          f"take minutes per step: its cost per token grows as the window fills, so a shorter run flatters it. "
          f"Decoding: batch 1, {res['new_tokens']} greedy tokens after a 16-token prompt, one call per token "
          f"carrying the state, all gates on (expert bias on, SSM on, no early exit); the reference has no state, "
          f"so no naive decoder. Median of {res['repeats']}, contestants interleaved.\n",
          markdown_table(["preset", "work", "naive loop tok/s (measured)", "hiermem tok/s", "hiermem / naive",
                          "public code tok/s (quoted, not measured here)", "hiermem / quoted", "target"], main_rows),
          "\nThe quoted figures are the public code's on a 2-core CPU (its tiny: 87M parameters, 4 experts top-2; "
          "ours: 8 experts top-2); this run uses the thread count above.\n",
          "\nMoE against a dense model of equal active FFN parameters (same config, num_experts 1, top_k 1, "
          "intermediate_size 2x; the router of one expert remains), same run, interleaved with the rows above:\n",
          markdown_table(["model", "parameters", "active per token", "active FFN", "train tok/s", "read tok/s"],
                         moe_rows),
          "\nDecoding with the compute gates (interleaved; multiply-adds per token from `out.compute`):\n",
          markdown_table(["preset", "gates", "layers run", "SSM blocks run", "tok/s", "multiply-adds vs full",
                          "time vs full"], gate_rows),
          f"\nAn expert-sized fp32 product ((512, 512) x (512, 2048)) runs at {2 * rate / 1e9:.1f} GFLOP/s on "
          f"this thread count. " + "; ".join(ceilings) + ".\n",
          "\nTargets (x the quoted figures): " + "; ".join(checks) + ".\n"]
    return "\n".join(md)


if __name__ == "__main__":
    main()
