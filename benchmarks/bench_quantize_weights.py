"""Weight-only quantization (q8_0, q4_0, q2_k) of the released from-scratch models: size, quality, speed.

For ``hierarchos-shakespeare`` and ``hrmlm-shakespeare`` and each variant (fp32; q8_0 and q4_0 with
embedding tables and output heads left in float; "+head": those quantized too, as `hiermem quantize`
does by default; q2_k +head where a model has weights of >= 256 inputs): the weights file on disk in MB, bits per byte on the Shakespeare test split (``score_model``, the function `hiermem
eval` scores from-scratch models with: each document read from a fresh state), reading tok/s
(one forward over ``--read-tokens`` tokens, no grad) and decoding tok/s (``model.decoder()`` fed
one greedy token at a time after a 64-token prompt). Quantized weights are dequantized once per
model call (the default); for q4_0 the two other modes (on every read of a weight, once for
good) are timed too. Speeds are the best of ``--repeats`` on one thread (``OMP_NUM_THREADS=1``).

    OMP_NUM_THREADS=1 python benchmarks/bench_quantize_weights.py      # ~5 minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from hiermem.errors import ConfigError

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import benchmark_tokens, machine, markdown_table, print_header, write_results  # noqa: E402

MODELS = ("hierarchos-shakespeare", "hrmlm-shakespeare")
VARIANTS = (("fp32", None, False), ("q8_0", "q8_0", False), ("q4_0", "q4_0", False),
            ("q8_0 +head", "q8_0", True), ("q4_0 +head", "q4_0", True), ("q2_k +head", "q2_k", True))


@torch.no_grad()
def read_speed(model, ids: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids[None], return_logits=False)
        best = min(best, time.perf_counter() - t)
    return ids.numel() / best


@torch.no_grad()
def decode_speed(model, ids: torch.Tensor, new: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        dec = model.decoder()
        logits = dec.feed(ids[None, :64])
        t = time.perf_counter()
        for _ in range(new):
            logits = dec.feed(logits.argmax(-1, keepdim=True))
        best = min(best, time.perf_counter() - t)
    return new / best


def bits_per_byte(model, docs) -> float:
    from hiermem.evaluation.perplexity import score_model

    return score_model(model, docs, 512, model.tokenizer).summary()["bpb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=2048, help="tokens per test document scored")
    ap.add_argument("--documents", type=int, default=2, help="test documents scored")
    ap.add_argument("--read-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from hiermem.evaluation.loading import load_token_documents, select_documents
    from hiermem.inference.quantize_weights import quantize_folder, set_dequant_mode
    from hiermem.models import load_model, released_weights

    info = machine(torch.device("cpu"))
    print_header("Weight-only quantization of the released from-scratch models", info)
    rows, data = [], {"machine": info, "settings": vars(args), "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="hiermem-quant-"))
    for name in MODELS:
        if released_weights(name) is None:
            print(f"{name}: not installed, skipped")
            continue
        base = load_model(name).eval()
        docs = select_documents(load_token_documents(base.tokenizer, "shakespeare", "test"),
                                max_tokens=args.eval_tokens, max_documents=args.documents)
        ids = benchmark_tokens(base.tokenizer, max(args.read_tokens, 64))
        out = data["models"][name] = {}
        for label, fmt, head in VARIANTS:
            if fmt is None:
                model, path = base, released_weights(name) / "model.safetensors"
            else:
                folder = tmp / f"{name}-{fmt}-{int(head)}"
                try:
                    quantize_folder(name, folder, fmt, include_head=head)
                except ConfigError as exc:  # q2_k: no weight wide enough
                    print(f"{name} {label}: skipped ({exc})")
                    continue
                model, path = load_model(folder).eval(), folder / "quantized.safetensors"
            r = {"mb": path.stat().st_size / 1e6, "bpb": bits_per_byte(model, docs),
                 "read_tok_s": read_speed(model, ids[:args.read_tokens], args.repeats),
                 "decode_tok_s": decode_speed(model, ids, args.new_tokens, args.repeats)}
            if label == "q4_0":
                for mode in ("read", "resident"):
                    set_dequant_mode(model, mode)
                    r[f"read_tok_s_{mode}"] = read_speed(model, ids[:args.read_tokens], args.repeats)
                    r[f"decode_tok_s_{mode}"] = decode_speed(model, ids, args.new_tokens, args.repeats)
                set_dequant_mode(model, "forward")
            out[label] = r
            rows.append([name, label, f"{r['mb']:.2f}", f"{r['bpb']:.4f}", f"{r['bpb'] - out['fp32']['bpb']:+.4f}",
                         round(r["read_tok_s"]), round(r["decode_tok_s"])])
            print(" | ".join(map(str, rows[-1])), flush=True)
        data["models"][name]["tokens_scored"] = sum(int(d.ids.numel()) for d in docs)
    headers = ["model", "weights", "MB on disk", "bpb", "bpb - fp32", "read tok/s", "decode tok/s"]
    modes = [[n, m, round(v["q4_0"][f"read_tok_s{s}"]), round(v["q4_0"][f"decode_tok_s{s}"])]
             for n, v in data["models"].items()
             for m, s in (("once per call (default)", ""), ("on every read", "_read"), ("once, kept (float)", "_resident"))]
    md = (f"# Weight-only quantization of the released from-scratch models\n\ncommand: `{info['command']}`\n\n"
          f"machine: {info['cpu']}, {info['torch_threads']} torch thread(s), torch {info['torch']}, load average "
          f"{info['load_average']}\n\nbpb: Shakespeare test split, {args.documents} documents x up to "
          f"{args.eval_tokens} tokens, each read from a fresh state. Reading: one call over {args.read_tokens} "
          f"tokens; decoding: {args.new_tokens} greedy tokens one at a time after a 64-token prompt; best of "
          f"{args.repeats}. +head: embedding tables and output heads quantized too.\n\n"
          + markdown_table(headers, rows)
          + "\n## q4_0: when the weights are dequantized\n\n"
          + markdown_table(["model", "dequantized", "read tok/s", "decode tok/s"], modes))
    for p in write_results("quantize_weights", data, md):
        print("wrote", p)


if __name__ == "__main__":
    main()
