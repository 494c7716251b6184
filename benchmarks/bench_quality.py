"""Quality table: ``hiermem eval`` on the Shakespeare test split, with the released HMT weights when present.

Targets (DESIGN.md): HMT below the sliding-window backbone at equal segment length, and at least 10%
below independent chunks. Without released weights the memory is untrained and the table says so.
HMT puts BOS before every backbone call; a second run scores the backbone baselines with BOS before
every window too (``--bos-baselines``), so the comparison holds either way. A third, smaller run
compares FIFO and attention eviction with a cache small enough to fill (``--eviction-cache-size``;
the trained N=300 never fills on these documents).
Results: ``results/quality.{md,json}`` plus ``results/quality/``, ``results/quality-bos/`` and
``results/quality-eviction/`` (results.json, CSV, diagnostics PNG). ``--render-only`` rewrites the markdown from them.

    python benchmarks/bench_quality.py                              # 5 documents x 8192 tokens
    python benchmarks/bench_quality.py --documents 1 --max-tokens 2048 --no-recall   # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, pick_device, print_header  # noqa: E402


def target_lines(methods: dict, baselines: dict | None = None, label: str = "") -> list[str]:
    """Target checks of the HMT methods against the baselines (default: those of the same run)."""
    baselines = baselines or methods
    lines = []
    for hmt in ("hmt-fifo", "hmt-attention"):
        if hmt not in methods:
            continue
        h = methods[hmt]["ppl"]
        if "sliding" in baselines:
            s = baselines["sliding"]["ppl"]
            lines.append(f"{hmt} {h:.2f} vs sliding window{label} {s:.2f}: {100 * (h / s - 1):+.1f}% "
                         f"(target below: {'met' if h < s else 'MISSED'})")
        if "chunks" in baselines:
            c = baselines["chunks"]["ppl"]
            lines.append(f"{hmt} {h:.2f} vs chunks{label} {c:.2f}: {100 * (h / c - 1):+.1f}% "
                         f"(target <= -10%: {'met' if h <= 0.9 * c else 'MISSED'})")
    return lines


def render(meta: dict, res: dict, evict: dict | None = None, bos: dict | None = None) -> str:
    """The markdown page from the run's description and ``hiermem eval``'s results.json."""
    from hiermem.evaluation import report

    info, weights = meta["machine"], meta["checkpoint"]
    md = [f"# Quality: long-document perplexity on the Shakespeare test split\n\n`{info['command']}`\n",
          f"Checkpoint: {weights or '**none: untrained memory** (no released weights installed)'}. Machine: "
          f"{info['cpu']}, {info['torch_threads']} threads, {info.get('gpu', info['device'])}; "
          f"{res['seconds']} s.\n", f"Settings: {json.dumps(res['perplexity']['settings'])}\n",
          "```\n" + report.perplexity_table(res["perplexity"]) + "\n```\n",
          *(f"- {ln}" for ln in target_lines(res["perplexity"]["methods"]))]
    if bos:
        md += ["\n## Backbone baselines with BOS before every window\n",
               "The same documents and tokens; only the baselines' input changes (HMT's rows are above).\n",
               "```\n" + report.perplexity_table(bos["perplexity"]) + "\n```\n",
               *(f"- {ln}" for ln in target_lines(res["perplexity"]["methods"], bos["perplexity"]["methods"],
                                                  " with BOS"))]
    if res.get("diagnostics"):
        md += ["\n## Memory diagnostics\n", "```\n" + report.diagnostics_table(res["diagnostics"]) + "\n```\n",
               "![recall distance and eviction ages](quality/memory_diagnostics.png)\n"]
    if res.get("recall"):
        md += ["\n## Recall tasks\n", "```\n" + report.recall_table(res["recall"]["summary"]) + "\n```\n"]
    if evict:
        n = evict["perplexity"]["settings"]["hmt-fifo"]["cache_size"]
        md += [f"\n## FIFO vs attention eviction (cache size {n}, "
               f"{evict['perplexity']['settings']['documents']} document(s))\n",
               "```\n" + report.perplexity_table(evict["perplexity"]) + "\n```\n",
               "```\n" + report.diagnostics_table(evict["diagnostics"]) + "\n```\n",
               "![eviction ages](quality-eviction/memory_diagnostics.png)\n"]
    return "\n".join(md) + "\n"


def main() -> None:
    from hiermem.evaluation.cli import evaluate
    from hiermem.models import released_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the released weights, else untrained memory")
    p.add_argument("--documents", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: window // 2)")
    p.add_argument("--cache-size", type=int, default=None)
    p.add_argument("--recall", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the passkey and needle tasks")
    p.add_argument("--recall-lengths", nargs="*", type=int, default=[1024, 4096])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--eviction-cache-size", type=int, default=8, help="cache size of the eviction comparison (0: skip)")
    p.add_argument("--eviction-documents", type=int, default=2)
    p.add_argument("--bos-baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the backbone baselines with BOS before every window")
    p.add_argument("--render-only", action="store_true", help="rewrite quality.md from the last run's results")
    args = p.parse_args()
    out, out_evict, out_bos = RESULTS / "quality", RESULTS / "quality-eviction", RESULTS / "quality-bos"

    def saved(folder: Path) -> dict | None:
        return json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else None

    if args.render_only:
        meta = json.loads((RESULTS / "quality.json").read_text())
        (RESULTS / "quality.md").write_text(render(meta, saved(out), saved(out_evict), saved(out_bos)))
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    info = machine(device)
    print_header("HMT quality benchmark", info)
    weights = args.checkpoint or (f"released weights {released_weights().name}" if released_weights() else None)
    print(f"checkpoint: {weights or 'none: untrained memory over the bundled backbone'}")
    tasks = ("perplexity", "diagnostics") + (("passkey", "needle") if args.recall else ())
    evaluate(checkpoint=args.checkpoint, source="shakespeare", split="test", documents=args.documents,
             max_tokens=args.max_tokens, tasks=tasks, stride=args.stride, cache_size=args.cache_size,
             recall_lengths=tuple(args.recall_lengths), output=str(out), device=str(device))
    if args.bos_baselines:
        evaluate(checkpoint=args.checkpoint, source="shakespeare", split="test", documents=args.documents,
                 max_tokens=args.max_tokens, methods=("chunks", "sliding", "full"), tasks=("perplexity",),
                 stride=args.stride, baseline_bos=True, output=str(out_bos), device=str(device))
    if args.eviction_cache_size:
        evaluate(checkpoint=args.checkpoint, source="shakespeare", split="test", documents=args.eviction_documents,
                 max_tokens=args.max_tokens, methods=("hmt-fifo", "hmt-attention"), tasks=("perplexity", "diagnostics"),
                 cache_size=args.eviction_cache_size, output=str(out_evict), device=str(device))
    res, evict, bos = saved(out), saved(out_evict) if args.eviction_cache_size else None, None
    print("\n" + "\n".join(target_lines(res["perplexity"]["methods"])))
    if args.bos_baselines:
        bos = saved(out_bos)
        print("\n".join(target_lines(res["perplexity"]["methods"], bos["perplexity"]["methods"], " with BOS")))
    meta = {"machine": info, "checkpoint": weights}
    (RESULTS / "quality.json").write_text(json.dumps(meta, indent=2) + "\n")
    (RESULTS / "quality.md").write_text(render(meta, res, evict, bos))
    print(f"wrote {RESULTS / 'quality.md'}, {RESULTS / 'quality.json'} and {out}/")


if __name__ == "__main__":
    main()
