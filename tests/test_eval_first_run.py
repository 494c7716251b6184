"""`hiermem eval` on a user's own documents: every document read unless a split is asked for (and
then the ones left out are named), a perplexity-by-position PNG for every run, readable diagnostics."""

import json
import logging
import sys

import pytest

from hiermem.cli import main
from hiermem.evaluation.diagnostics import diagnostics_figure
from hiermem.evaluation.report import diagnostics_table, perplexity_figure
from tiny import tiny_model_folder

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalfirst")
    ckpt = tiny_model_folder(root, chat_template=False)
    docs = root / "my_docs"
    docs.mkdir()
    for name in ("act1.txt", "act2.txt"):  # by the hash of their id: act1 in train, act2 in test
        (docs / name).write_text(f"{name}\n" + TEXT * 3)
    return root, ckpt


def _eval(root, ckpt, *args, out: str = "out") -> dict:
    assert main(["eval", "--checkpoint", str(ckpt), "--source", str(root / "my_docs"), "--max-tokens", "60",
                 "--methods", "chunks", "hmt-fifo", "--tasks", "perplexity", "--output", str(root / out), *args]) == 0
    return json.loads((root / out / "results.json").read_text())


def test_own_folder_is_read_whole_by_default(tiny, capsys):
    root, ckpt = tiny
    res = _eval(root, ckpt)
    assert res["split"] == "all" and res["perplexity"]["settings"]["documents"] == 2
    assert [d["id"] for d in res["perplexity"]["documents"]] == ["act1.txt", "act2.txt"]
    assert "2 document(s) (act1.txt, act2.txt)" in capsys.readouterr().out


def test_an_asked_split_names_the_documents_it_leaves_out(tiny, caplog):
    root, ckpt = tiny
    with caplog.at_level(logging.WARNING):
        res = _eval(root, ckpt, "--split", "test")
    assert [d["id"] for d in res["perplexity"]["documents"]] == ["act2.txt"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "evaluating 1 of its 2 documents" in warning and "left out" in warning and "act1.txt" in warning
    assert "--split all" in warning


def test_every_perplexity_run_draws_perplexity_by_position(tiny):
    root, ckpt = tiny
    res = _eval(root, ckpt)
    png = root / "out" / "perplexity_by_position.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (root / "out" / "memory_diagnostics.png").exists()
    fig = perplexity_figure(res["perplexity"])
    ppl = fig.axes[0]
    assert {line.get_label().split()[0] for line in ppl.get_lines()} == {"chunks", "hmt-fifo"}
    L = res["perplexity"]["settings"]["segment_length"]
    assert list(ppl.get_lines()[0].get_xdata()) == [0, L, 2 * L, 3 * L]  # 59 scored tokens, L = 16


def test_diagnostics_plot_and_table_without_evictions():
    diag = {"hmt-fifo": {"recall": {"retrievals": 4, "mean_distance": 1.5, "share_previous_segment": 0.6,
                                    "mean_top_weight": 0.7, "mean_normalised_entropy": 0.5, "distance": [1, 2, 3],
                                    "weight_share": [0.6, 0.3, 0.1], "top1_count": [3, 1, 0]},
                         "eviction": {"cache_size": 5, "evictions": 0}},
            "hmt-attention": {"recall": {"retrievals": 0}, "eviction": {"cache_size": 5, "evictions": 0}}}
    fig = diagnostics_figure(diag)
    assert len(fig.axes) == 1  # no empty eviction panel
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    table = diagnostics_table(diag)
    assert "nan" not in table and "hmt-attention" in table



def test_without_matplotlib_the_numbers_are_still_written(tiny, monkeypatch, caplog):
    root, ckpt = tiny
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with caplog.at_level(logging.WARNING):
        res = _eval(root, ckpt, out="no-plots")
    assert res["perplexity"]["settings"]["documents"] == 2
    assert (root / "no-plots" / "perplexity.csv").exists() and not list((root / "no-plots").glob("*.png"))
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)
