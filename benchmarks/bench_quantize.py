"""int8 dynamic quantization of the backbone: speed, memory and perplexity against fp32.

Variants (all on the same model and tokens): fp32; int8 default (activations smoothed, every linear
layer but the MLP output projections, LM head included); without the head; without smoothing; every
linear layer, with and without smoothing. For each:
the backbone's weight bytes, HMT's reading speed and perplexity over the first ``--tokens`` tokens of
the default corpus (Shakespeare, test split), and greedy decoding speed.

    python benchmarks/bench_quantize.py                  # 2048 tokens
    python benchmarks/bench_quantize.py --tokens 1024 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_tokens, machine, markdown_table, print_header, write_results  # noqa: E402

VARIANTS = {  # name -> (quantize_backbone options, smoothed); None: fp32
    "fp32": None,
    "int8 (default: smoothed, MLP output projections in fp32)": ({}, True),
    "int8, head in fp32": ({"include_head": False}, True),
    "int8, not smoothed": ({}, False),
    "int8, every linear, smoothed": ({"keep_float": ()}, True),
    "int8, every linear, not smoothed": ({"keep_float": ()}, False),
}


def weight_mb(backbone) -> float:
    from hiermem.inference.quantize import _dynamic_linear_cls, quantized_tensors

    if any(isinstance(m, _dynamic_linear_cls()) for m in backbone.modules()):
        tensors = quantized_tensors(backbone)
    else:
        tensors = {n: p for n, p in backbone.named_parameters()}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def measure(model, ids: torch.Tensor, decode_tokens: int, repeats: int) -> dict:
    from hiermem.inference.generate import GenerationConfig, generate

    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, labels=ids, return_logits=False)
        read_s = time.perf_counter() - start
        best = float("inf")
        cfg = GenerationConfig(max_new_tokens=decode_tokens)
        for _ in range(repeats):
            start = time.perf_counter()
            generate(model, ids[:, :32], cfg)
            best = min(best, time.perf_counter() - start)
    return {"ppl": round(out.loss.exp().item(), 3), "read_tok_s": round(ids.shape[1] / read_s, 1),
            "decode_tok_s": round(decode_tokens / best, 1), "weights_mb": round(weight_mb(model.backbone), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from hiermem.inference.quantize import CALIBRATION_TEXT, quantize_backbone
    from hiermem.inference.runtime import encode, load_for_inference

    info = machine(torch.device("cpu"))
    print_header("int8 dynamic quantization: speed, memory, perplexity", info)
    dense, tok = load_for_inference(None, device="cpu", dtype="float32")
    ids = benchmark_tokens(tok, args.tokens)[None]
    results = {}
    calibration = encode(tok, CALIBRATION_TEXT)
    for name, variant in VARIANTS.items():
        model = dense if variant is None else copy.deepcopy(dense)
        if variant is not None:
            options, smoothed = variant
            quantize_backbone(model.backbone, **options, calibration=calibration if smoothed else None)
        results[name] = measure(model, ids, args.decode_tokens, args.repeats)
        print(name, results[name], flush=True)
        if model is not dense:
            del model
    base = results["fp32"]
    rows = [[name, r["weights_mb"], r["read_tok_s"], r["decode_tok_s"], r["ppl"],
             f"{r['read_tok_s'] / base['read_tok_s']:.2f}x / {r['decode_tok_s'] / base['decode_tok_s']:.2f}x",
             f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}%"] for name, r in results.items()]
    md = (f"# int8 dynamic quantization (SmolLM2-135M backbone, HMT untrained memory)\n\n`{info['command']}`  \n"
          f"{info['cpu']}, {info['torch_threads']} threads, load average {info['load_average']}\n\n"
          f"Perplexity and reading speed over {args.tokens} tokens of the default corpus (test split); decoding "
          f"speed: {args.decode_tokens} greedy tokens after a 32-token prompt (best of {args.repeats}).\n\n"
          + markdown_table(["variant", "backbone weights MB", "read tok/s", "decode tok/s", "perplexity",
                            "speed vs fp32 (read / decode)", "perplexity change"], rows))
    results["machine"], results["config"] = info, vars(args)
    for p in write_results("quantize", results, md):
        print("wrote", p)


if __name__ == "__main__":
    main()
