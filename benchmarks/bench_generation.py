"""Generation speed with memory: HMT's incremental decoder against the backbone's own HF ``generate``.

Both read the same prompt (Shakespeare, test split) and decode greedily the same number of new
tokens, with the EOS token held back so that both produce exactly that many. The backbone uses its
KV cache over the whole context (which grows); HMT decodes inside a segment with its KV cache over
``[P*, sensory, segment]`` and folds each full segment into memory (summary pass, recall, a full
memory-encoding pass of the segment). Reported: decode tokens/s (prefill excluded), total time, RSS
growth, and where HMT's decode time goes (timers around the decoder's steps).

Target (DESIGN.md): HMT decode speed >= 0.9x the backbone's.

    python benchmarks/bench_generation.py                           # prompt 512, 512 new tokens
    python benchmarks/bench_generation.py --prompt-tokens 256 --new-tokens 256 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RssPeak, benchmark_tokens, machine, markdown_table, pick_device, print_header,  # noqa: E402
                    sync, write_results)


class Timers:
    """Wall time spent inside wrapped callables (instance attributes shadow the methods)."""

    def __init__(self, device):
        self.total, self.calls, self.device = defaultdict(float), defaultdict(int), device

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.total[label] += time.perf_counter() - start
                self.calls[label] += 1

        object.__setattr__(obj, name, timed)


def hf_generate(backbone, prompt, new_tokens, eos):
    """(prefill seconds, total seconds) of the backbone's own greedy generate with its KV cache."""
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=eos, min_new_tokens=new_tokens)
    sync(prompt.device)
    start = time.perf_counter()
    backbone.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, use_cache=True, pad_token_id=eos)
    sync(prompt.device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = backbone.generate(prompt, max_new_tokens=new_tokens, **kwargs)
    sync(prompt.device)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return prefill, time.perf_counter() - start


def hmt_generate(model, prompt, new_tokens, eos, timers: Timers | None = None):
    """(prefill seconds, total seconds) of hiermem's generate over HMT's decoder."""
    from hiermem.inference.generate import GenerationConfig, generate, make_decoder

    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos)
    decoder = make_decoder(model)
    if timers is not None:
        for name, label in (("_extend", "decode step (encode + head)"), ("_forward", "segment fold (forward)")):
            timers.wrap(decoder, name, label)
        for name, label in (("segment_prompt", "  segment prompt (summary + recall)"), ("summarize", "  summary passes"),
                            ("head", "  LM head"), ("recall", "  recall")):
            timers.wrap(model, name, label)
    sync(prompt.device)
    start = time.perf_counter()
    decoder.feed(prompt)
    sync(prompt.device)
    prefill = time.perf_counter() - start
    if timers is not None:
        timers.total.clear()
        timers.calls.clear()
    start = time.perf_counter()
    out = generate(model, prompt[:, :0], cfg, decoder=decoder)
    sync(prompt.device)
    assert out.tokens.shape[1] == new_tokens
    return prefill, prefill + time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="runs per method (the fastest counts)")
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    from hiermem.inference.runtime import load_for_inference

    model, tok = load_for_inference(None, device=str(device))
    if model.config.segment_length != args.segment_length:
        from hiermem.models.hmt import HMT

        model = HMT(model.backbone, model.config.replace(segment_length=args.segment_length),
                    bos_token_id=model.bos_token_id).eval()
    info = machine(device)
    print_header("generation speed: HMT decoder vs the backbone's HF generate (KV cache)", info)
    prompt = benchmark_tokens(tok, args.prompt_tokens)[None].to(device)
    eos = int(tok.eos_token_id)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # methods interleaved, so that a change of machine load hits both
        for name in ("backbone", "hmt"):
            with RssPeak(device) as rss, torch.no_grad():
                run = (hf_generate(model.backbone, prompt, args.new_tokens, eos) if name == "backbone"
                       else hmt_generate(model, prompt, args.new_tokens, eos))
            prefill, total = run
            run = {"prefill_s": prefill, "total_s": total, "decode_tok_s": args.new_tokens / (total - prefill),
                   **rss.report()}
            print(f"{name}: {run}")
            if name not in best or run["decode_tok_s"] > best[name]["decode_tok_s"]:
                best[name] = run
    results = dict(best)
    rows = [[name, round(r["prefill_s"], 2), round(r["total_s"], 2), round(r["decode_tok_s"], 1), r["rss_growth_mb"]]
            for name, r in best.items()]
    timers = Timers(device)
    with torch.no_grad():
        _, total = hmt_generate(model, prompt, args.new_tokens, eos, timers)
    decode_total = sum(v for k, v in timers.total.items() if not k.startswith(" "))
    profile = {k: {"seconds": round(v, 3), "calls": timers.calls[k]} for k, v in timers.total.items()}
    ratio = results["hmt"]["decode_tok_s"] / results["backbone"]["decode_tok_s"]
    results.update(ratio=ratio, target=0.9, profile=profile, machine=info,
                   config={**vars(args), "hmt": model.config.to_dict()})
    prof_rows = [[k, round(v["seconds"], 2), v["calls"], f"{100 * v['seconds'] / decode_total:.0f}%"]
                 for k, v in profile.items()]
    md = (f"# Generation speed with memory\n\n`{info['command']}`  \n{info['cpu']}, {info['torch_threads']} threads, "
          f"load average {info['load_average']}\n\nPrompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"greedy, segment length {model.config.segment_length} (+{model.config.sensory_length} sensory).\n\n"
          + markdown_table(["method", "prefill s", "total s", "decode tok/s", "RSS growth MB"], rows)
          + f"\n**HMT / backbone decode speed: {ratio:.2f}x** (target >= 0.9x)\n\nWhere HMT's decode time goes "
          "(one extra run with timers; indented rows are inside the rows above):\n\n"
          + markdown_table(["part", "seconds", "calls", "share"], prof_rows))
    for p in write_results("generation", results, md):
        print("wrote", p)
    print(f"HMT / backbone decode speed: {ratio:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
