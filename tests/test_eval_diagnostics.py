"""Memory diagnostics on real HMT recall traces: distance histogram, eviction ages, PNG."""

import torch

from hiermem.evaluation import eviction_stats, memory_diagnostics, plot_diagnostics, recall_histogram
from tiny import random_ids, tiny_hmt


def traces(eviction, cache_size=3, segments=9):
    model = tiny_hmt("llama", eviction=eviction, cache_size=cache_size)
    with torch.no_grad():
        out = model(random_ids(2, 16 * segments), return_logits=False, return_recall=True)
    return [out.recall]


def test_recall_histogram_accounts_for_every_retrieval():
    tr = traces("fifo")
    h = recall_histogram(tr)
    # segments 1..8 recall (segment 0 has an empty bank), two batch rows each
    assert h["retrievals"] == 8 * 2
    assert abs(sum(h["weight_share"]) - 1) < 1e-9
    assert sum(h["top1_count"]) == h["retrievals"]
    assert h["distance"][0] == 1 and max(h["distance"]) == 3  # FIFO with N=3 holds the last 3 segments
    assert 1 <= h["mean_distance"] <= 3
    assert 1 / 3 - 1e-6 <= h["mean_top_weight"] <= 1
    assert recall_histogram([[]]) == {"retrievals": 0}


def test_fifo_evicts_at_age_n_and_attention_differs():
    fifo = eviction_stats(traces("fifo"), cache_size=3)
    # bank full from segment 3 on; evictions at segments 3..7 are visible in the trace (8's is not), 2 rows
    assert fifo["evictions"] == 5 * 2
    assert fifo["age_min"] == fifo["age_max"] == 3
    assert fifo["kept_age_mean"] == 2.0
    att = eviction_stats(traces("attention"), cache_size=3)
    assert att["evictions"] == 5 * 2
    assert att["ages"] != fifo["ages"]


def test_plot_writes_a_png(tmp_path):
    diag = memory_diagnostics({"hmt-fifo": traces("fifo"), "hmt-attention": traces("attention")}, 3)
    assert set(diag) == {"hmt-fifo", "hmt-attention"}
    path = plot_diagnostics(diag, tmp_path / "sub" / "hist.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
