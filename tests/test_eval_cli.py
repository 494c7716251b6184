"""`hiermem eval` end to end: tiny checkpoint over local text files; one short run on the real SmolLM2."""

import csv
import json

import pytest

from hiermem.cli import main
from hiermem.evaluation.perplexity import METHODS
from tiny import tiny_model_folder

PLAY = ("ROMEO. But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET. O Romeo, Romeo, wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    ckpt = tiny_model_folder(root, chat_template=False)
    docs = root / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"play{i}.txt").write_text(f"Act {i}.\n" + PLAY * (4 + i))
    (root / "short").mkdir()
    (root / "short" / "note.txt").write_text("Too short.")
    return root, ckpt


def run(args, capsys):
    rc = main(["eval", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_writes_table_json_csv_and_png(tiny, capsys):
    root, ckpt = tiny
    out_dir = root / "out"
    rc, out, _ = run(["--checkpoint", str(ckpt), "--source", str(root / "docs"), "--split", "all",
                      "--documents", "2", "--max-tokens", "200", "--cache-size", "3", "--recall-lengths", "300",
                      "--recall-samples", "1", "--output", str(out_dir)], capsys)
    assert rc == 0
    for method in METHODS:
        assert f"\n{method} " in out
    assert "Recall accuracy" in out and "Memory diagnostics" in out
    res = json.loads((out_dir / "results.json").read_text())
    methods = res["perplexity"]["methods"]
    assert {m["tokens"] for m in methods.values()} == {2 * 199}
    assert res["perplexity"]["settings"]["hmt-attention"]["cache_size"] == 3
    assert res["diagnostics"]["hmt-attention"]["eviction"]["evictions"] > 0
    assert {r["method"] for r in res["recall"]["records"]} == {"hmt", "sliding"}
    rows = list(csv.DictReader((out_dir / "perplexity.csv").open()))
    overall = {r["method"]: float(r["ppl"]) for r in rows if r["segment"] == "all"}
    assert overall == pytest.approx({m: v["ppl"] for m, v in methods.items()})
    assert sum(int(r["tokens"]) for r in rows if r["method"] == "chunks" and r["segment"] != "all") == 398
    assert (out_dir / "recall.csv").exists() and (out_dir / "memory_diagnostics.png").stat().st_size > 10_000


def test_eval_baseline_bos_flag(tiny, capsys):
    root, ckpt = tiny
    figures = {}
    for flag in ("--baseline-bos", "--no-baseline-bos"):
        out_dir = root / f"out{flag}"
        rc, _, _ = run(["--checkpoint", str(ckpt), "--source", str(root / "docs"), "--split", "all", "--documents",
                        "1", "--max-tokens", "100", "--methods", "chunks", "--tasks", "perplexity", flag,
                        "--output", str(out_dir)], capsys)
        assert rc == 0
        res = json.loads((out_dir / "results.json").read_text())["perplexity"]
        assert res["settings"]["baseline_bos"] is (flag == "--baseline-bos")
        figures[flag] = res["methods"]["chunks"]["ppl"]
    assert figures["--baseline-bos"] != pytest.approx(figures["--no-baseline-bos"], rel=1e-4)


def test_eval_bad_input_gives_one_line_errors(tiny, capsys):
    root, ckpt = tiny
    common = ["--checkpoint", str(ckpt), "--tasks", "perplexity", "--output", ""]
    rc, _, err = run([*common, "--source", str(root / "docs"), "--split", "all", "--methods", "chunks", "rwkv"], capsys)
    assert rc == 2 and "unknown perplexity method" in err and "hmt-attention" in err
    rc, _, err = run([*common, "--source", str(root / "short"), "--split", "all"], capsys)
    assert rc == 2 and "at least 17 tokens" in err
    rc, _, err = run([*common, "--source", str(root / "docs"), "--split", "all", "--tasks", "ppl"], capsys)
    assert rc == 2 and "unknown task" in err


@pytest.mark.slow
def test_eval_on_smollm2_sliding_window_beats_chunks(capsys, tmp_path):
    rc, out, _ = run(["--documents", "1", "--max-tokens", "700", "--tasks", "perplexity", "--methods", "chunks",
                      "sliding", "hmt-fifo", "--output", str(tmp_path)], capsys)
    assert rc == 0
    methods = json.loads((tmp_path / "results.json").read_text())["perplexity"]["methods"]
    assert {m["tokens"] for m in methods.values()} == {699}
    assert 2 < methods["sliding"]["ppl"] < methods["chunks"]["ppl"] < 200  # more context, lower perplexity


def test_table_buckets_segments_by_powers_of_two():
    from hiermem.evaluation.report import perplexity_table, segment_buckets

    assert segment_buckets(1) == [(0, 1)]
    assert segment_buckets(11) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 11)]
    by_segment = [{"segment": j, "nll": 1.0 + j, "tokens": 10} for j in range(3)]
    table = perplexity_table({"methods": {"chunks": {"ppl": 5.0, "tokens": 30, "by_segment": by_segment},
                                          "hmt-fifo": {"ppl": 4.0, "tokens": 30, "by_segment": by_segment}}})
    lines = table.splitlines()
    assert lines[0].split() == ["method", "ppl", "vs", "chunks", "seg", "0", "seg", "1", "seg", "2"]
    assert lines[3].split()[:3] == ["hmt-fifo", "4.00", "-20.0%"]
    assert lines[4].split() == ["tokens", "30", "10", "10", "10"]
