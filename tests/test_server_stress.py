"""`hiermem serve` under stress, on a real uvicorn server on loopback with the tiny model: the event
loop stays responsive while every worker is busy; a bounded fuzz and soak run never gets a 5xx."""

import statistics
import threading
import time

import httpx
import pytest
import torch
from tiny import tiny_hmt, tiny_tokenizer

from hiermem.inference.server import create_app, running

KEY = "sk-stress-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = dict(max_concurrency=2, max_queue=6, max_prompt_tokens=1000, max_tokens_limit=1000, max_beams=4,
              max_stops=4, max_stop_chars=256, queue_timeout_s=2.0, max_sessions=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def maximal(session_id: str, beams: int = 4) -> dict:
    """A request at every limit: prompt tokens, max_tokens, beams, stop strings (count and length)."""
    return {"model": "tiny", "prompt": "p" * (LIMITS["max_prompt_tokens"] - 2), "session_id": session_id,
            "max_tokens": LIMITS["max_tokens_limit"], "min_tokens": LIMITS["max_tokens_limit"], "stream": True,
            "num_beams": beams, "temperature": 0, "stop": [c * LIMITS["max_stop_chars"] for c in "#$%&"]}


def test_health_answers_within_100ms_while_every_worker_is_busy(tmp_path):
    app = create_app(tiny_hmt("llama"), tiny_tokenizer(), model_name="tiny", api_key=KEY,
                     session_dir=str(tmp_path), **LIMITS)
    with running(app) as url:
        stop = threading.Event()

        def busy(i):  # maximal requests, one after another, on both workers
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
                while not stop.is_set():
                    with c.stream("POST", "/v1/completions", json=maximal(f"w{i}", beams=4 - 3 * i)) as r:
                        for _ in r.iter_lines():
                            if stop.is_set():
                                break

        def flood():  # bodies at the size limit and sessions evicted to disk and restored
            huge = {"model": "tiny", "prompt": "q" * ((4 << 20) - 100)}
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
                n = 0
                while not stop.is_set():
                    c.post("/v1/completions", json=huge if n % 2 else {**maximal(f"f{n % 6}"), "stream": False,
                                                                           "max_tokens": 8, "min_tokens": 0})
                    n += 1

        threads = [threading.Thread(target=busy, args=(i,)) for i in range(2)] + [threading.Thread(target=flood)]
        for t in threads:
            t.start()
        latencies = []
        try:
            with httpx.Client(base_url=url, timeout=10) as probe, httpx.Client(base_url=url, headers=AUTH) as admin:
                deadline = time.monotonic() + 30
                while admin.get("/v1/status").json()["active"] < 2:
                    assert time.monotonic() < deadline, "the workers never got busy"
                    time.sleep(0.05)
                for _ in range(30):
                    start = time.perf_counter()
                    assert probe.get("/health").status_code == 200
                    latencies.append(time.perf_counter() - start)
                    time.sleep(0.03)
                # still busy at the end (a worker may sit between two of its back-to-back requests)
                deadline = time.monotonic() + 5
                while admin.get("/v1/status").json()["active"] < 2:
                    assert time.monotonic() < deadline, "a worker stopped being busy during the probes"
                    time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    latencies.sort()
    assert latencies[-2] < 0.1 and statistics.median(latencies) < 0.05, [round(x * 1000, 1) for x in latencies]
