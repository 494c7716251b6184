"""Why int8 stays on ``torch.ao`` dynamic quantization: it against torchao on this CPU.

``hiermem quantize`` uses ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86 kernels), which
torch has deprecated in favour of torchao. This measures both on the linear layers of a
SmolLM2-135M-shaped stack (6 blocks of 576 -> 1536 -> 576, no bias) and its 576 -> 49152 head,
fp32 baseline, one thread: a 256-row prefill and a 1-row decode step, with the largest output
difference from fp32. torchao is not a dependency: ``pip install torchao`` to run it.

    python benchmarks/bench_int8_backends.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, print_header, write_results  # noqa: E402


def stack() -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(576, 1536, bias=False), nn.SiLU(), nn.Linear(1536, 576, bias=False))
              for _ in range(6)]
    return nn.Sequential(*blocks, nn.Linear(576, 49152, bias=False)).eval()


@torch.inference_mode()
def ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    info = machine(torch.device("cpu"))
    print_header("int8 backends on CPU (SmolLM2-shaped linear layers)", info)
    base = stack()
    prefill, decode = torch.randn(256, 576), torch.randn(1, 576)
    with torch.inference_mode():
        ref = base(prefill)
    variants = {"fp32": base}
    from torch.ao.quantization import quantize_dynamic

    variants["torch.ao dynamic int8 (hiermem quantize)"] = quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                                            dtype=torch.qint8)
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for label, config in ((f"torchao {torchao.__version__} int8 dynamic", Int8DynamicActivationInt8WeightConfig()),
                              (f"torchao {torchao.__version__} int8 weight-only", Int8WeightOnlyConfig())):
            model = copy.deepcopy(base)
            quantize_(model, config)
            variants[label] = model
    except ImportError:
        print("torchao is not installed (pip install torchao): measuring torch.ao only")
    rows = []
    for label, model in variants.items():
        with torch.inference_mode():
            err = (model(prefill) - ref).abs().max().item()
        p, d = ms(model, prefill, 10), ms(model, decode, 50)
        rows.append({"backend": label, "prefill_ms": round(p, 2), "decode_ms": round(d, 3), "max_abs_diff": err})
        print(f"{label:45s} prefill {p:8.2f} ms   decode {d:7.3f} ms   max |diff| {err:.2e}")
    fp32 = rows[0]
    table = markdown_table(["backend", "prefill 256 rows (ms)", "decode 1 row (ms)", "vs fp32 prefill",
                            "vs fp32 decode", "max abs diff"],
                           [[r["backend"], r["prefill_ms"], r["decode_ms"],
                             f"{fp32['prefill_ms'] / r['prefill_ms']:.2f}x", f"{fp32['decode_ms'] / r['decode_ms']:.2f}x",
                             f"{r['max_abs_diff']:.1e}"] for r in rows])
    md = (f"# int8 backends on CPU\n\n`{info['command']}` on {info['cpu']}, one thread, torch {info['torch']}, "
          f"load average {info['load_average']}.\n\nSmolLM2-135M-shaped linear layers (6 x 576 -> 1536 -> 576 "
          f"and the 576 -> 49152 head), median of 10 prefills / 50 decode steps.\n\n{table}\n")
    for path in write_results("int8_backends", {"machine": info, "results": rows}, md):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
