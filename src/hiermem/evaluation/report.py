"""Evaluation output: terminal tables, JSON and CSV."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from hiermem.evaluation.perplexity import BACKBONE_METHODS, METHODS, MODEL_METHOD
from hiermem.io import atomic_write_bytes, atomic_write_json


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain aligned table; floats with 2 decimals (4 significant digits below 1); "-" where there
    is no figure (None, NaN)."""
    def cell(v):
        if v is None or isinstance(v, float) and math.isnan(v):
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


def segment_buckets(n: int) -> list[tuple[int, int]]:
    """Segment index ranges 0, 1, 2-3, 4-7, ... covering 0..n-1."""
    out, lo = [], 0
    while lo < n:
        hi = min(n, 1 if lo == 0 else 2 * lo)
        out.append((lo, hi))
        lo = hi
    return out


def _bucket(by_segment: list[dict], lo: int, hi: int, metric: str = "ppl") -> tuple[float, int]:
    """(ppl or bpb, tokens) of segments lo..hi-1 together (token- or byte-weighted)."""
    rows = [r for r in by_segment[lo:hi] if r["tokens"]]
    tokens = sum(r["tokens"] for r in rows)
    nll_sum = sum(r["nll"] * r["tokens"] for r in rows)
    if metric == "bpb":
        nbytes = sum(r.get("bytes") or 0 for r in rows)
        return (nll_sum / (math.log(2) * nbytes) if nbytes else float("nan")), tokens
    return (math.exp(nll_sum / tokens) if tokens else float("nan")), tokens


def _in_method_order(methods: dict) -> dict:
    """The baselines, ``model``, then HMT's variants in METHODS order, then the rest as given (JSON
    files written with sorted keys lose the order)."""
    order = [*BACKBONE_METHODS, MODEL_METHOD, *METHODS]
    rank = {m: i for i, m in enumerate(dict.fromkeys(order))}
    return dict(sorted(methods.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def perplexity_table(result: dict) -> str:
    """Methods x (ppl, bpb when known, change vs chunks when present, ppl by segment-index bucket),
    a row of token counts; then, when bytes are known, bits per byte by the same buckets."""
    methods = _in_method_order(result["methods"])
    n = max(len(m["by_segment"]) for m in methods.values())
    buckets = segment_buckets(n)
    names = [f"seg {lo}" if hi - lo == 1 else f"seg {lo}-{hi - 1}" for lo, hi in buckets]
    has_bpb = all("bpb" in m for m in methods.values())
    ref = methods.get("chunks", {}).get("ppl")
    rows = []
    for name, m in methods.items():
        extra = [m["bpb"]] if has_bpb else []
        change = [f"{100 * (m['ppl'] / ref - 1):+.1f}%"] if ref else []
        rows.append([name, m["ppl"], *extra, *change, *(_bucket(m["by_segment"], lo, hi)[0] for lo, hi in buckets)])
    first = next(iter(methods.values()))
    pad = [""] * (int(has_bpb) + int(bool(ref)))
    rows.append(["tokens", first["tokens"], *pad, *(_bucket(first["by_segment"], lo, hi)[1] for lo, hi in buckets)])
    headers = ["method", "ppl", *(["bpb"] if has_bpb else []), *(["vs chunks"] if ref else []), *names]
    table = format_table(headers, rows)
    if has_bpb:
        bpb_rows = [[name, m["bpb"], *(_bucket(m["by_segment"], lo, hi, "bpb")[0] for lo, hi in buckets)]
                    for name, m in methods.items()]
        bpb_rows.append(["bytes", first.get("bytes", ""),
                         *(sum(r.get("bytes") or 0 for r in first["by_segment"][lo:hi]) for lo, hi in buckets)])
        table += "\n\nBits per byte:\n" + format_table(["method", "bpb", *names], bpb_rows)
    return table


def perplexity_rows(result: dict) -> list[dict]:
    """Flat rows for CSV: one per method and segment index, plus segment 'all' (bpb, bytes when known)."""
    rows = []
    for name, m in _in_method_order(result["methods"]).items():
        rows.append({"method": name, "segment": "all", **{k: v for k, v in m.items() if k != "by_segment"}})
        rows += [{"method": name, **r} for r in m["by_segment"]]
    return rows


def recall_table(summary: dict) -> str:
    """(task, method) x accuracy by length, and overall."""
    lengths = sorted({int(n) for t in summary.values() for m in t.values() for n in m["by_length"]})
    rows = []
    for task, methods in summary.items():
        for method, m in methods.items():
            by = {int(k): v for k, v in m["by_length"].items()}
            rows.append([task, method, *(f"{by[n]['accuracy']:.0%} ({by[n]['samples']})" if n in by else "-"
                                         for n in lengths), f"{m['accuracy']:.0%}"])
    return format_table(["task", "method", *(f"{n} tok" for n in lengths), "all"], rows)


def diagnostics_table(diag: dict) -> str:
    rows = []
    for method, d in diag.items():
        r, e = d["recall"], d["eviction"]
        rows.append([method, r.get("retrievals", 0), r.get("mean_distance", float("nan")),
                     r.get("share_previous_segment", float("nan")), r.get("mean_top_weight", float("nan")),
                     r.get("mean_normalised_entropy", float("nan")), e["evictions"],
                     e.get("age_mean", float("nan")), e.get("kept_age_mean", float("nan"))])
    return format_table(["method", "retrievals", "mean dist", "prev seg", "top weight", "entropy", "evictions",
                         "evicted age", "kept age"], rows)


def perplexity_figure(result: dict):
    """Perplexity by position in the document (one point per segment, at its first token), every
    method on the same axes; bits per byte beside it when known (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = _in_method_order(result["methods"])
    L = result.get("settings", {}).get("segment_length") or 1
    has_bpb = all("bpb" in m for m in methods.values())
    fig, axes = plt.subplots(1, 2 if has_bpb else 1, figsize=(11 if has_bpb else 6.5, 4), squeeze=False)
    for ax, metric, label in zip(axes[0], ("ppl", "bpb"), ("perplexity", "bits per byte")):
        for name, m in methods.items():
            rows = [r for r in m["by_segment"] if r["tokens"]]
            ax.plot([r["segment"] * L for r in rows], [r[metric] for r in rows], marker=".",
                    label=f"{name} ({m[metric]:.2f})")
        ax.set(title=f"{label.capitalize()} by position", xlabel="position in the document (tokens)",
               ylabel=f"{label} of the segment")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (folders created) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_perplexity(result: dict, path: str | Path) -> Path:
    """Write :func:`perplexity_figure` as a PNG."""
    return save_figure(perplexity_figure(result), path)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write dict rows (columns = union of keys, first-seen order) atomically."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
    return Path(path)


def write_json(path: str | Path, data: dict) -> Path:
    atomic_write_json(path, data)
    return Path(path)
