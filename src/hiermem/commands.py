"""Small top-level commands: ``hiermem info`` and ``hiermem demo``."""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time

import torch

from hiermem.backbones import DEFAULT_BACKBONE


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def info() -> int:
    """Print versions, the compute device, bundled backbones, corpora and released weights."""
    import transformers

    from hiermem import __version__
    from hiermem.backbones import available_backbones, cache_dir
    from hiermem.data import available_corpora
    from hiermem.models import WEIGHTS_ROOT, released_weights

    rows = [("hiermem", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("transformers", transformers.__version__),
            ("device", f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"),
            ("cpu threads", str(torch.get_num_threads())), ("cache", str(cache_dir()))]
    rows += [(f"backbone {k}", v) for k, v in available_backbones().items()]
    rows += [(f"corpus {k}", v) for k, v in available_corpora().items()]
    names = sorted(p.name for p in WEIGHTS_ROOT.glob("*") if released_weights(p.name)) if WEIGHTS_ROOT.exists() else []
    rows.append(("released weights", ", ".join(names) or "none installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def demo(tokens: int = 4096, document: str | None = None, model: str | None = None,
         backbone: str = DEFAULT_BACKBONE, max_new_tokens: int = 40, device: str | None = None,
         threads: int | None = None) -> int:
    """Main job on the bundled defaults: HMT against the plain backbone on a long document.

    Loads SmolLM2-135M, wraps it with HMT (the released memory weights when installed), reads a
    held-out Shakespeare play, prints the per-segment perplexity of the backbone run chunk by chunk
    beside HMT's, throughput and peak memory, then generates a continuation through memory.

    Args:
        tokens: how many tokens of the document to read (rounded down to whole segments).
        document: document id from the shakespeare corpus (default: the first test-split play long enough).
        model: HMT checkpoint folder or released-weights name (default: released weights).
        backbone: backbone spec used when no released weights are installed.
        max_new_tokens: length of the generated continuation.
        device: cpu, cuda or cuda:N (default: CUDA when present, else CPU)
        threads: CPU threads for torch (default: torch's choice).
    """
    from tqdm import tqdm

    from hiermem.backbones import load_backbone
    from hiermem.data import corpus, select_split
    from hiermem.errors import DataError
    from hiermem.inference.generate import GenerationConfig, generate
    from hiermem.models import load_model, released_weights
    from hiermem.models.hmt import HMT, HMTDecoder

    if threads:
        torch.set_num_threads(threads)
    t0, rss0 = time.perf_counter(), _rss_mb()
    bb = load_backbone(backbone, device=device)
    hmt = load_model(model, backbone=bb)
    weights = "released weights" if (model is None and released_weights()) else (model or "untrained memory")
    L = hmt.config.segment_length
    tok = bb.tokenizer
    docs = corpus("shakespeare")
    if document is not None:
        chosen = [d for d in docs if d.id == document or d.id.endswith("/" + document)]
        if not chosen:
            raise DataError(f"no shakespeare document {document!r}; ids look like 'shakespeare/hamlet'")
    else:
        chosen = [d for d in select_split(docs, "test") if len(d.text) > 6 * tokens]
    doc = (chosen or select_split(docs, "test"))[0]
    ids = torch.tensor([tok(doc.text).input_ids], device=hmt.device)
    n = min(ids.shape[1], max(tokens, 2 * L)) // L * L
    ids = ids[:, :n]
    print(f"document {doc.id}: reading {n} tokens = {n // L} segments of {L} "
          f"(HMT: {weights}, backbone {bb.spec}, {hmt.config.sensory_length} sensory tokens, "
          f"cache {hmt.config.cache_size}, stage {hmt.config.stage})")
    load_s = time.perf_counter() - t0

    chunks = HMT(bb.model, hmt.config.replace(use_memory=False, sensory_length=0, lora=None, segment_bos=None))
    results = {}
    with torch.inference_mode():
        for name, m in (("backbone (chunks)", chunks), ("HMT", hmt)):
            bar = tqdm(total=n, desc=name, unit="tok", leave=False)
            start = time.perf_counter()
            out = m(ids, labels=ids, return_logits=False, return_token_nll=True, on_segment=bar.update)
            bar.close()
            results[name] = (out, time.perf_counter() - start)
    base, hm = results["backbone (chunks)"][0], results["HMT"][0]
    print(f"\n{'segment':>7} {'tokens':>6} {'backbone ppl':>13} {'HMT ppl':>9}")
    for i in range(n // L):
        a, b = base.token_nll[0, i * L:(i + 1) * L], hm.token_nll[0, i * L:(i + 1) * L]
        print(f"{i:>7} {a.numel():>6} {_ppl(float(a.sum()), a.numel()):>13.2f} {_ppl(float(b.sum()), b.numel()):>9.2f}")
    for name, (out, secs) in results.items():
        print(f"{name:<18} ppl {math.exp(float(out.loss)):8.2f} over {out.num_tokens} tokens, "
              f"{n / secs:6.1f} tok/s ({secs:.1f} s)")
    print(f"HMT / backbone perplexity: {math.exp(float(hm.loss) - float(base.loss)):.3f}")

    dec = HMTDecoder(hmt, state=hm.state, last_logits=hm.last_logits)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                           eos_token_id=tok.eos_token_id)
    start = time.perf_counter()
    gen = generate(hmt, ids[:, :0], cfg, decoder=dec)
    gen_s = time.perf_counter() - start
    print(f"\ncontinuation ({gen.tokens.shape[1]} tokens, {gen.tokens.shape[1] / gen_s:.1f} tok/s, memory "
          f"{dec.stats()['slots_used']} slots, {dec.stats()['tokens']} tokens read):")
    print("  ..." + tok.decode(ids[0, -24:]).replace("\n", "\n  ") + "\u2192" +
          tok.decode(gen.tokens[0]).replace("\n", "\n  "))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s (load {load_s:.1f} s); RSS {rss0:.0f} MB at start, "
          f"peak {_peak_rss_mb():.0f} MB")
    return 0
