"""Memory diagnostics from HMT recall traces: which past segment retrieval attends to, and eviction.

A trace is what ``HMT.forward(..., return_recall=True)`` returns: per segment that recalled,
``(segment index n, slot sources (B, s), recall weights (B, s))``. The distance of a slot is
``n - source``: 1 is the previous segment. Evictions are read off consecutive trace entries (a
source present before segment n's update and gone after it was evicted at age ``n - source``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def recall_histogram(traces: list[list]) -> dict:
    """Recall weight share and top-1 counts by distance, over all retrievals of all traces."""
    mass = torch.zeros(1, dtype=torch.float64)
    top = torch.zeros(1, dtype=torch.long)
    retrievals, max_w, entropy = 0, 0.0, 0.0
    for trace in traces:
        for seg, sources, weights in trace:
            dist = (seg - sources).reshape(-1).long()  # (B * s,)
            w = weights.reshape(-1).double()
            size = int(dist.max()) + 1
            if size > mass.shape[0]:
                mass = torch.cat([mass, mass.new_zeros(size - mass.shape[0])])
                top = torch.cat([top, top.new_zeros(size - top.shape[0])])
            mass += torch.bincount(dist, weights=w, minlength=mass.shape[0])
            top += torch.bincount((seg - sources.gather(1, weights.argmax(1, keepdim=True))).reshape(-1),
                                  minlength=top.shape[0])
            n = sources.shape[1]
            retrievals += sources.shape[0]
            max_w += float(weights.max(1).values.double().sum())
            if n > 1:  # entropy relative to uniform attention over the bank: 1 = uniform
                p = weights.double().clamp_min(1e-12)
                entropy += float((-(p * p.log()).sum(1) / math.log(n)).sum())
    if not retrievals:
        return {"retrievals": 0}
    share = (mass / mass.sum()).tolist()
    return {"retrievals": retrievals,
            "mean_distance": float((mass * torch.arange(mass.shape[0])).sum() / mass.sum()),
            "share_previous_segment": share[1] if len(share) > 1 else 0.0,
            "mean_top_weight": max_w / retrievals, "mean_normalised_entropy": entropy / retrievals,
            "distance": list(range(1, len(share))), "weight_share": share[1:], "top1_count": top.tolist()[1:]}


def eviction_stats(traces: list[list], cache_size: int) -> dict:
    """Age (in segments) of each evicted slot, and of the slots still held at the end."""
    ages, kept = [], []
    for trace in traces:
        for (seg, src, _), (nxt, src2, _) in zip(trace, trace[1:]):
            if nxt != seg + 1:
                continue
            for row, row2 in zip(src.tolist(), src2.tolist()):
                ages += [seg - s for s in set(row) - set(row2)]
        if trace:
            seg, src, _ = trace[-1]
            kept += (seg - src).reshape(-1).tolist()
    out = {"cache_size": cache_size, "evictions": len(ages)}
    if ages:
        a = torch.tensor(ages, dtype=torch.float64)
        out.update(age_mean=float(a.mean()), age_median=float(a.median()), age_min=int(a.min()),
                   age_max=int(a.max()), ages=sorted(ages))
    if kept:
        out["kept_age_mean"] = float(torch.tensor(kept, dtype=torch.float64).mean())
    return out


def memory_diagnostics(traces: dict[str, list[list]], cache_size: int) -> dict:
    """method -> {recall: recall_histogram, eviction: eviction_stats} for every traced HMT method."""
    return {m: {"recall": recall_histogram(t), "eviction": eviction_stats(t, cache_size)}
            for m, t in traces.items() if t}


def diagnostics_figure(diag: dict):
    """Recall weight share by distance (integer segments, linear axis) and, when any slot was
    evicted, a second panel with the ages of evicted slots, per method (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evicted = {m: d["eviction"] for m, d in diag.items() if d["eviction"].get("evictions")}
    fig, axes = plt.subplots(1, 2 if evicted else 1, figsize=(11 if evicted else 6.5, 4), squeeze=False)
    left = axes[0][0]
    for method, d in diag.items():
        rec = d["recall"]
        if rec.get("retrievals"):
            left.plot(rec["distance"], rec["weight_share"], marker=".",
                      label=f"{method} (mean {rec['mean_distance']:.1f})")
    title = "Which past segment retrieval attends to"
    if not evicted:
        title += "\n(no slot evicted: the cache never filled)"
    left.set(title=title, xlabel="distance (current - source segment)", ylabel="share of recall weight")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evicted:
        right = axes[0][1]
        for method, ev in evicted.items():
            right.hist(ev["ages"], bins=range(ev["age_min"], ev["age_max"] + 2), alpha=0.6, align="left",
                       label=f"{method} (n={ev['evictions']}, mean {ev['age_mean']:.1f})")
        right.set(title="Age of evicted memory slots", xlabel="age at eviction (segments)", ylabel="evictions")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_diagnostics(diag: dict, path: str | Path) -> Path:
    """Write :func:`diagnostics_figure` as a PNG."""
    from hiermem.evaluation.report import save_figure

    return save_figure(diagnostics_figure(diag), path)
