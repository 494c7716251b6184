"""Fuzz and soak `hiermem serve` on a real uvicorn server on loopback (tiny model, bounded: a few
hundred requests): zero 5xx, no crashed worker, memory back near its warm level, every session
file whole."""

import ctypes
import gc
import logging
import time
from collections import Counter

import httpx
import psutil
import pytest
import server_fuzz
import torch
from tiny import tiny_hmt, tiny_tokenizer

from hiermem.inference.server import create_app, running
from hiermem.inference.sessions import Session

KEY = "sk-fuzz-0123456789abcdef"


@pytest.fixture(autouse=True)
def one_thread_per_worker():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # count live memory, not what glibc keeps for reuse
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def test_fuzz_and_soak_never_fail_the_server(tmp_path, caplog):
    model = tiny_hmt("llama")
    app = create_app(model, tiny_tokenizer(), model_name="tiny", api_key=KEY, session_dir=str(tmp_path),
                     max_sessions=3, max_concurrency=2, max_queue=8, queue_timeout_s=60, max_body_bytes=1 << 18,
                     max_prompt_tokens=2000, max_tokens_limit=64, max_json_values=4096)
    server = app.state.hiermem
    fuzz = server_fuzz.Fuzzer(seed=1234, model="tiny", body_limit=1 << 18)
    caplog.set_level(logging.ERROR, logger="hiermem")
    start = time.monotonic()
    with running(app) as url:
        warm = server_fuzz.run(url, fuzz.cases(60), KEY)
        rss_warm = _rss()
        soak = server_fuzz.run(url, fuzz.cases(300), KEY)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as h:
            deadline = time.monotonic() + 30
            while (status := h.get("/v1/status").json())["active"] or status["waiting"]:
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            rss_after = _rss()
            ok = h.post("/v1/completions", json={"model": "tiny", "prompt": "still alive", "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert all(t.is_alive() for t in server.pool._threads)  # no crashed worker
    results = warm + soak
    by_category = Counter(r.category for r in results)
    statuses = Counter(r.status for r in results)
    assert set(by_category) == set(server_fuzz.CATEGORIES) and len(results) >= 360
    failures = [r for r in results if not isinstance(r.status, int) or r.status >= 500]
    assert not failures, (failures[:5], statuses)
    assert statuses[200] > 50 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 150, statuses
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rss_after <= 1.10 * rss_warm, (rss_warm >> 20, rss_after >> 20)
    files = list(tmp_path.rglob("*"))
    sessions = [f for f in files if f.is_file()]
    assert sessions and all(f.suffix == ".safetensors" and not f.name.startswith(".") for f in sessions), files
    for f in sessions:  # written whole (atomically), each loads
        Session.load(f, model)
    assert time.monotonic() - start < 60
