"""`hiermem eval` end to end: tiny checkpoint over local text files; one short run on the real SmolLM2."""

import csv
import json
import math

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
    assert {m["bytes"] for m in methods.values()} == {2 * 199}  # one byte per token (character tokenizer)
    assert all(m["bpb"] == pytest.approx(m["nll"] / math.log(2)) for m in methods.values())
    assert all("bpb" in r for m in methods.values() for r in m["by_segment"])
    assert res["perplexity"]["settings"]["hmt-attention"]["cache_size"] == 3
    assert res["diagnostics"]["hmt-attention"]["eviction"]["evictions"] > 0
    assert {r["method"] for r in res["recall"]["records"]} == {"hmt", "sliding"}
    rows = list(csv.DictReader((out_dir / "perplexity.csv").open()))
    overall = {r["method"]: float(r["ppl"]) for r in rows if r["segment"] == "all"}
    assert overall == pytest.approx({m: v["ppl"] for m, v in methods.items()})
    assert sum(int(r["tokens"]) for r in rows if r["method"] == "chunks" and r["segment"] != "all") == 398
    assert {r["method"]: float(r["bpb"]) for r in rows if r["segment"] == "all"} == pytest.approx(
        {m: v["bpb"] for m, v in methods.items()})
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
    nowhere = ["--backbone", str(root / "missing-backbone")]  # checked before anything is loaded
    rc, _, err = run([*common, *nowhere, "--source", str(root / "docs"), "--split", "all", "--methods", "rwkv"], capsys)
    assert rc == 2 and "unknown perplexity method" in err
    rc, _, err = run([*common, *nowhere, "--source", str(root / "docs"), "--split", "all", "--max-tokens", "-5"],
                     capsys)
    assert rc == 2 and "--max-tokens must be at least 2, got -5" in err


@pytest.fixture(scope="module")
def scratch(tiny, tmp_path_factory):
    """A from-scratch Transformer saved with its byte tokenizer, as `hiermem train` leaves runs/x/final."""
    from hiermem.models.transformer import Transformer, TransformerConfig
    from hiermem.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("scratch")
    tok = train_tokenizer(None, root / "tok", type="byte")
    model = Transformer(TransformerConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                          context_length=64, eos_token_id=tok.eos_token_id))
    model.tokenizer = tok
    model.save_pretrained(root / "final")
    return root / "final"


def test_eval_from_scratch_model_reports_bpb(tiny, scratch, capsys):
    root, _ = tiny
    out_dir = root / "out-scratch"
    rc, out, _ = run(["--checkpoint", str(scratch), "--source", str(root / "docs"), "--split", "all", "--documents",
                      "2", "--max-tokens", "300", "--segment-length", "64", "--recall-lengths", "300",
                      "--recall-samples", "1", "--output", str(out_dir)], capsys)
    assert rc == 0 and "Bits per byte" in out and "Recall accuracy (transformer" in out
    res = json.loads((out_dir / "results.json").read_text())
    assert res["model_type"] == "transformer" and res["backbone"] is None and "diagnostics" not in res
    ppl = res["perplexity"]
    assert list(ppl["methods"]) == ["model"] and ppl["settings"]["segment_length"] == 64
    m = ppl["methods"]["model"]
    assert m["tokens"] == m["bytes"] == 2 * 299  # byte tokenizer, ASCII text: one byte per scored token
    assert m["bpb"] == pytest.approx(m["nll"] / math.log(2))
    assert len(m["by_segment"]) == 5 and [r["bytes"] for r in m["by_segment"]] == [2 * 63, 128, 128, 128, 2 * 44]
    assert all(r["bpb"] == pytest.approx(r["nll"] / math.log(2)) for r in m["by_segment"])
    assert 7.5 < m["bpb"] < 8.5  # untrained: about log2(260) bits per byte
    assert {r["method"] for r in res["recall"]["records"]} == {"transformer"}
    rows = list(csv.DictReader((out_dir / "perplexity.csv").open()))
    assert [r["segment"] for r in rows] == ["all", "0", "1", "2", "3", "4"] and all(r["bpb"] for r in rows)


def test_eval_from_scratch_refuses_what_needs_a_backbone_or_memory(tiny, scratch, capsys):
    root, _ = tiny
    common = ["--checkpoint", str(scratch), "--source", str(root / "docs"), "--split", "all", "--output", ""]
    rc, _, err = run([*common, "--methods", "model", "sliding"], capsys)
    assert rc == 2 and "'sliding'" in err and "choose among model" in err and "pretrained backbone" in err
    rc, _, err = run([*common, "--tasks", "perplexity", "diagnostics"], capsys)
    assert rc == 2 and "diagnostics need an HMT checkpoint" in err
    rc, _, err = run([*common, "--cache-size", "3"], capsys)
    assert rc == 2 and "cache" in err


def test_eval_quantized_checkpoint_measures_the_int8_model(tiny, capsys):
    root, ckpt = tiny
    assert main(["quantize", "--model", str(ckpt), str(root / "q")]) == 0
    figures = {}
    for name, folder in (("float", ckpt), ("int8", root / "q")):
        rc, _, _ = run(["--checkpoint", str(folder), "--source", str(root / "docs"), "--split", "all", "--documents",
                        "1", "--max-tokens", "100", "--methods", "chunks", "model", "--tasks", "perplexity",
                        "--output", str(root / f"out-{name}")], capsys)
        assert rc == 0
        figures[name] = json.loads((root / f"out-{name}" / "results.json").read_text())
    assert figures["int8"]["backbone"] == str(root / "q" / "backbone")
    for m in ("chunks", "model"):
        f, q = (figures[k]["perplexity"]["methods"][m] for k in ("float", "int8"))
        assert q["tokens"] == f["tokens"] and q["ppl"] != f["ppl"] and q["ppl"] == pytest.approx(f["ppl"], rel=0.1)


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
