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


def hmt_backbone_positions(config, segments: int) -> int:
    """Positions an HMT with ``config`` feeds its backbone to read ``segments`` whole segments from a
    fresh state (what :meth:`HMT.forward` runs; ``config.segment_bos`` as resolved by the model).

    Per segment n = 0, 1, ...: the memory-encoding pass ``[bos?, P, sensory, segment, P]`` (BOS when
    ``segment_bos``; the two P only with ``use_memory``; sensory = the last ``sensory_length`` tokens
    read before, none for the first segment) and, at ``stage`` 2, the summary pass
    ``[bos?, T, summary tokens, T]`` for the segments where recall needs it: those that find two or
    more memories in the bank (n >= 2 and ``cache_size`` >= 2; one memory is taken as it is).
    With memory off and no sensory tokens this is the backbone on independent chunks.
    """
    L, bos, memory = config.segment_length, int(bool(config.segment_bos)), bool(config.use_memory)
    total = 0
    for n in range(segments):
        total += bos + 2 * memory + min(config.sensory_length, n * L) + L
        if memory and config.stage == 2 and min(config.cache_size, n) >= 2:
            total += bos + 1 + config.summary_tokens + 1
    return total


def sliding_backbone_positions(tokens: int, window: int, stride: int, bos: bool = False) -> int:
    """Positions :func:`~hiermem.evaluation.perplexity.window_nll` feeds the backbone to score
    tokens 1..T-1 of ``tokens`` T tokens through windows of ``window`` moved by ``stride``."""
    from hiermem.evaluation.perplexity import plan_windows

    return sum(w.end - w.start + int(bos) for w in plan_windows(tokens, window, stride))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_window(window: int | None, stride: int | None, bos: bool = False,
                  max_positions: int | None = None) -> None:
    """The sliding window's options (None: not chosen yet), before and after the backbone loads."""
    from hiermem.errors import ConfigError

    if window is not None and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"window must be an integer >= 1 (tokens the sliding window reads), got {window!r}")
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise ConfigError(f"stride must be an integer >= 1 (tokens the sliding window moves by), got {stride!r}")
    if window is not None and stride is not None and stride > window:
        raise ConfigError(f"stride ({stride}) cannot exceed the window ({window}): tokens between windows "
                          "would never be scored")
    if window is not None and max_positions and window + bos > max_positions:
        raise ConfigError(f"window {window}{' + BOS' if bos else ''} exceeds the backbone's {max_positions} "
                          "positions; use a shorter window")


def _read_three_ways(hmt, chunks, ids: torch.Tensor, window: int, stride: int) -> dict:
    """Per-token NLL (T-1,), seconds and backbone positions of the backbone on chunks, the backbone
    through a sliding window and HMT, each reading ``ids`` (1, T) from the start."""
    from tqdm import tqdm

    from hiermem.evaluation.perplexity import window_nll

    n, L = ids.shape[1], hmt.config.segment_length
    bos = chunks.bos_token_id if chunks.config.segment_bos else None  # the same input rule as chunks
    results = {}
    with torch.inference_mode():
        for name in ("chunks", "sliding window", "HMT"):
            bar = tqdm(total=n, desc=name, unit="tok", leave=False)
            start = time.perf_counter()
            if name == "sliding window":
                nll = window_nll(chunks.backbone, ids[0], window, stride, bos_token_id=bos, batch_size=1)
                out = None
                bar.update(n)
                positions = sliding_backbone_positions(n, window, stride, bos is not None)
            else:
                m = hmt if name == "HMT" else chunks
                out = m(ids, labels=ids, return_logits=False, return_token_nll=True, on_segment=bar.update)
                nll = out.token_nll[0]
                positions = hmt_backbone_positions(m.config, n // L)
            _sync(ids.device)
            secs = time.perf_counter() - start
            bar.close()
            results[name] = {"nll": nll.float().cpu(), "seconds": secs, "positions": positions, "out": out}
    return results


def _report(results: dict, n: int, L: int) -> None:
    """Per-segment perplexity of each method, then one line per method with its cost, then ratios."""
    names = list(results)
    print("\n" + f"{'segment':>7} {'tokens':>6}" + "".join(f" {name + ' ppl':>18}" for name in names))
    for i in range(n // L):
        parts = [results[name]["nll"][i * L:(i + 1) * L] for name in names]
        print(f"{i:>7} {parts[0].numel():>6}" + "".join(f" {_ppl(float(p.sum()), p.numel()):>18.2f}" for p in parts))
    print()
    ppl = {}
    for name, r in results.items():
        ppl[name] = _ppl(float(r["nll"].double().sum()), r["nll"].numel())
        print(f"{name:<15} ppl {ppl[name]:8.2f} over {r['nll'].numel()} tokens, {n / r['seconds']:7.1f} tok/s "
              f"({r['seconds']:.1f} s), {r['positions'] / n:.2f} backbone positions per token "
              f"({r['positions']} for {n})")
    print(f"HMT / chunks perplexity: {ppl['HMT'] / ppl['chunks']:.3f}; "
          f"HMT / sliding window perplexity: {ppl['HMT'] / ppl['sliding window']:.3f}")


def demo(tokens: int = 4096, document: str | None = None, model: str | None = None,
         backbone: str = DEFAULT_BACKBONE, window: int | None = None, stride: int | None = None,
         max_new_tokens: int = 40, device: str | None = None, dtype: str | None = None,
         threads: int | None = None) -> int:
    """Main job on the bundled defaults: HMT against the plain backbone (chunks, sliding window) on a long document.

    Loads SmolLM2-135M, wraps it with HMT (the released memory weights when installed), reads a
    held-out Shakespeare play three ways: the backbone on independent chunks of HMT's segment
    length, the backbone through a sliding window, and HMT. Prints each segment's perplexity under
    the three, then per method its perplexity, tokens/s and cost in backbone positions fed per
    token read (all three at batch 1), and peak memory; then generates a continuation through memory.

    Args:
        tokens: how many tokens of the document to read (rounded down to whole segments).
        document: document id from the shakespeare corpus (default: the first test-split play long enough).
        model: HMT checkpoint folder or released-weights name (default: released weights).
        backbone: backbone spec used when no released weights are installed.
        window: tokens the sliding-window backbone reads at once (default: HMT's segment length).
        stride: tokens the sliding window moves by, 1 to window (default: half the window).
        max_new_tokens: length of the generated continuation.
        device: cpu, cuda or cuda:N (default: CUDA when present, else CPU)
        dtype: float32 or bfloat16 (default: bfloat16 on CUDA when supported, else float32).
        threads: CPU threads for torch (default: torch's choice).
    """
    from hiermem.backbones import load_backbone
    from hiermem.data import corpus, select_split
    from hiermem.errors import DataError
    from hiermem.inference.generate import GenerationConfig, generate
    from hiermem.models import load_model, released_weights
    from hiermem.models.hmt import HMT, HMTDecoder

    _check_window(window, stride)  # before anything loads
    if threads:
        torch.set_num_threads(threads)
    t0, rss0 = time.perf_counter(), _rss_mb()
    bb = load_backbone(backbone, device=device, dtype=dtype)
    hmt = load_model(model, backbone=bb)
    weights = "released weights" if (model is None and released_weights()) else (model or "untrained memory")
    L = hmt.config.segment_length
    chunks = HMT(bb.model, hmt.config.replace(use_memory=False, sensory_length=0, lora=None, segment_bos=None))
    window = L if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    _check_window(window, stride, bool(chunks.config.segment_bos),
                  getattr(bb.model.config, "max_position_embeddings", None))
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
          f"(HMT: {weights}, backbone {bb.spec} in {str(hmt.summary_prompt.dtype).removeprefix('torch.')}, "
          f"{hmt.config.sensory_length} sensory tokens, cache {hmt.config.cache_size}, stage {hmt.config.stage}; "
          f"sliding window {window}, stride {stride})")
    load_s = time.perf_counter() - t0

    results = _read_three_ways(hmt, chunks, ids, window, stride)
    _report(results, n, L)

    hm = results["HMT"]["out"]
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
