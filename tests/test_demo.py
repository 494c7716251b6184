"""`hiermem demo`: chunks, sliding window and HMT read the same tokens side by side, each with its
cost in backbone positions per token, counted exactly as the backbone is fed."""

import re

import pytest
import torch
from tiny import random_ids, tiny_backbone, tiny_hmt, tiny_model_folder

from hiermem.cli import main
from hiermem.commands import hmt_backbone_positions, sliding_backbone_positions
from hiermem.evaluation.perplexity import window_nll

PLAY = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, my lord.\n" for i in range(40))


@pytest.fixture
def play(monkeypatch):
    from hiermem.data import corpora

    docs = [corpora.Document(f"shakespeare/play{i}", PLAY) for i in range(3)]
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", lambda: docs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("demo"))  # segments of 16, 4 sensory, cache 5


def _demo(capsys, folder, *extra) -> tuple[int, str, str]:
    code = main(["demo", "--model", str(folder), "--backbone", str(folder.parent / "backbone"),
                 "--document", "play1", "--tokens", "64", "--max-new-tokens", "4", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _method_lines(out: str) -> dict[str, dict]:
    pattern = re.compile(r"^(chunks|sliding window|HMT) +ppl +([\d.]+) over (\d+) tokens, +([\d.]+) tok/s "
                         r"\(([\d.]+) s\), ([\d.]+) backbone positions per token \((\d+) for (\d+)\)$")
    found = {}
    for line in out.splitlines():
        m = pattern.match(line)
        if m:
            found[m[1]] = {"ppl": float(m[2]), "scored": int(m[3]), "tok_s": float(m[4]), "cost": m[6],
                           "positions": int(m[7]), "tokens": int(m[8])}
    return found


def test_demo_prints_three_methods_with_their_costs(play, folder, capsys):
    code, out, _ = _demo(capsys, folder)
    assert code == 0, out
    assert "reading 64 tokens = 4 segments of 16" in out and "sliding window 16, stride 8" in out
    lines = _method_lines(out)
    assert list(lines) == ["chunks", "sliding window", "HMT"], out
    for r in lines.values():
        assert r["tokens"] == 64 and r["scored"] == 63 and r["tok_s"] > 0 and r["ppl"] > 1
    # chunks: 4 x 16 positions, no BOS (memory off)
    assert (lines["chunks"]["positions"], lines["chunks"]["cost"]) == (64, "1.00")
    # sliding: windows [0,16) [8,24) ... [40,56), then [47,63) (the last token predicts nothing): 6 x 16 + 15
    assert (lines["sliding window"]["positions"], lines["sliding window"]["cost"]) == (111, "1.73")
    # HMT: encoding [BOS, P, sensory, 16, P] = 19 for segment 0, 23 after; summary [BOS, T, 8, T] = 11 for
    # segments 2 and 3, the first to find two memories in the bank
    assert (lines["HMT"]["positions"], lines["HMT"]["cost"]) == (19 + 3 * 23 + 2 * 11, "1.72")
    assert lines["chunks"]["positions"] < lines["HMT"]["positions"] < lines["sliding window"]["positions"]

    table = out[out.index("segment "):].splitlines()
    assert table[0].split() == ["segment", "tokens", "chunks", "ppl", "sliding", "window", "ppl", "HMT", "ppl"]
    rows = [row.split() for row in table[1:5]]
    assert [r[:2] for r in rows] == [["0", "16"], ["1", "16"], ["2", "16"], ["3", "15"]]
    # the first window is the first chunk: the same predictions from the same 16 tokens
    assert float(rows[0][2]) == pytest.approx(float(rows[0][3]), abs=0.011)
    ratios = re.search(r"HMT / chunks perplexity: ([\d.]+); HMT / sliding window perplexity: ([\d.]+)", out)
    assert float(ratios[1]) == pytest.approx(lines["HMT"]["ppl"] / lines["chunks"]["ppl"], rel=2e-3)
    assert float(ratios[2]) == pytest.approx(lines["HMT"]["ppl"] / lines["sliding window"]["ppl"], rel=2e-3)
    assert "continuation (4 tokens" in out


def test_demo_window_and_stride_options(play, folder, capsys):
    code, out, _ = _demo(capsys, folder, "--window", "32", "--stride", "32", "--dtype", "float32")
    assert code == 0, out
    lines = _method_lines(out)
    assert (lines["sliding window"]["positions"], lines["sliding window"]["cost"]) == (32 + 31, "0.98")


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "window must be an integer >= 1"),
    (["--stride", "0"], "stride must be an integer >= 1"),
    (["--window", "8", "--stride", "9"], "stride (9) cannot exceed the window (8)"),
    (["--stride", "17"], "stride (17) cannot exceed the window (16)"),  # the default window: L = 16
    (["--window", "600"], "window 600 exceeds the backbone's 512 positions"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_demo_refuses_bad_window_options(play, folder, capsys, args, message):
    code, _, err = _demo(capsys, folder, *args)
    assert code == 2 and message in err, err


def _counting(module):
    """A list that receives the positions of every call of ``module`` (batch x length)."""
    seen = []

    def hook(_, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
        seen.append(x.shape[0] * x.shape[1])

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("config", [
    {},
    {"segment_bos": False},
    {"stage": 1},
    {"cache_size": 1},
    {"cache_size": 2, "summary_length": 3, "summary_source": "segment"},
    {"sensory_length": 0, "summary_batch": 2},
    {"use_memory": False, "sensory_length": 0},
    {"use_memory": False},
])
def test_hmt_positions_are_what_the_backbone_reads(config):
    model = tiny_hmt(**config)
    seen = _counting(model.backbone.base_model)
    with torch.no_grad():
        model(random_ids(1, 7 * 16), labels=random_ids(1, 7 * 16), return_logits=False)
    assert sum(seen) == hmt_backbone_positions(model.config, 7)


@pytest.mark.parametrize("tokens, window, stride, bos", [(64, 16, 8, None), (100, 16, 16, None), (50, 20, 7, 1)])
def test_sliding_positions_are_what_the_backbone_reads(tokens, window, stride, bos):
    model = tiny_backbone()
    seen = _counting(model.base_model)
    window_nll(model, random_ids(1, tokens)[0], window, stride, bos_token_id=bos, batch_size=3)
    assert sum(seen) == sliding_backbone_positions(tokens, window, stride, bos is not None)
