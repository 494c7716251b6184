"""Load test of `hiermem serve` on loopback: N concurrent clients for T seconds.

Starts the server in a subprocess (127.0.0.1, a free port), then runs ``--clients`` asyncio clients
for ``--seconds``; each client has its own memory session and cycles through a completion, a
streamed chat completion and a streamed completion. Requests are bounded in number (the clients stop
issuing after T seconds) and in time (``--request-timeout``). Reported: throughput, p50/p99 latency,
status counts (target: zero 5xx), and the server's RSS before and after the run (and its peak).

    python benchmarks/bench_server_load.py                        # default model, 8 clients, 30 s
    python benchmarks/bench_server_load.py --model FOLDER --clients 16 --seconds 20 --max-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, print_header, write_results  # noqa: E402

PROMPTS = ["The king spoke to his daughters and said", "Once more unto the breach, dear friends,",
           "What light through yonder window breaks?", "All the world's a stage, and"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(i: int, base: str, stop_at: float, args, log: list) -> None:
    kinds = ("completion", "chat-stream", "completion-stream")
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout) as http:
        n = 0
        while time.monotonic() < stop_at:
            kind, prompt = kinds[n % 3], PROMPTS[(i + n) % len(PROMPTS)]
            body = {"model": args.model_name, "max_tokens": args.max_tokens, "temperature": 0.7, "seed": n,
                    "session_id": f"client-{i}"}
            if kind.startswith("chat"):
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
            else:
                path, body["prompt"] = "/v1/completions", prompt
            body["stream"] = kind.endswith("stream")
            start, status, tokens = time.monotonic(), None, 0
            try:
                if body["stream"]:
                    async with http.stream("POST", path, json=body) as r:
                        status = r.status_code
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                tokens += 1
                else:
                    r = await http.post(path, json=body)
                    status = r.status_code
                    if status == 200:
                        tokens = r.json()["usage"]["completion_tokens"]
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            log.append({"kind": kind, "status": status, "latency": time.monotonic() - start, "tokens": tokens})
            n += 1
            if status == 429:
                await asyncio.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled default model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--max-concurrency", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=16)
    args = ap.parse_args()
    if args.clients < 1 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be >= 1 and --seconds in (0, 600]")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "hiermem.cli", "serve", "--port", str(port), "--max-concurrency",
           str(args.max_concurrency), "--max-queue", str(args.max_queue), "--device", "cpu"]
    if args.model:
        cmd += ["--model", args.model]
    env = {k: v for k, v in os.environ.items() if k != "HIERMEM_API_KEY"}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    info = machine(torch.device("cpu"))
    info["torch_threads"] = "server default"
    print_header(f"server load: {args.clients} clients for {args.seconds:g} s", info)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(base + "/v1/status").json()  # model and session counts (no key here)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        args.model_name = health["model"]
        proc = psutil.Process(server.pid)
        rss_before = proc.memory_info().rss
        peak, done = [rss_before], threading.Event()

        def sample():
            while not done.wait(0.2):
                peak.append(proc.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log: list[dict] = []

        async def run():
            stop_at = time.monotonic() + args.seconds
            await asyncio.gather(*(client(i, base, stop_at, args, log) for i in range(args.clients)))

        start = time.monotonic()
        asyncio.run(run())
        wall = time.monotonic() - start
        done.set()
        sampler.join()
        rss_after = proc.memory_info().rss
        health = httpx.get(base + "/v1/status").json()  # model and session counts (no key here)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    ok = [r for r in log if r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in log)
    server_errors = sum(n for s, n in statuses.items() if s.startswith("5") or not s.isdigit())
    lat = [r["latency"] for r in ok]
    results = {
        "requests": len(log), "ok": len(ok), "statuses": dict(statuses), "server_errors": server_errors,
        "throughput_req_s": round(len(ok) / wall, 3), "throughput_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "latency_p50_s": round(percentile(lat, 0.5), 3), "latency_p99_s": round(percentile(lat, 0.99), 3),
        "wall_s": round(wall, 1), "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1), "rss_peak_mb": round(max(peak) / 2**20, 1),
        "sessions_held": health["sessions"], "machine": info, "config": vars(args),
        "by_kind": {k: {"ok": sum(1 for r in ok if r["kind"] == k),
                        "p50_s": round(percentile([r["latency"] for r in ok if r["kind"] == k], 0.5), 3)}
                    for k in ("completion", "chat-stream", "completion-stream")},
    }
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    rows = [[k, v["ok"], v["p50_s"]] for k, v in results["by_kind"].items()]
    md = (f"# Server load test\n\n`{info['command']}`  \n{info['cpu']}, load average {info['load_average']}\n\n"
          f"{args.clients} clients for {args.seconds:g} s on loopback, {args.max_tokens} new tokens per request, one "
          f"memory session per client; server: {args.max_concurrency} workers, queue {args.max_queue}.\n\n"
          + markdown_table(["requests", "ok", "5xx / transport errors", "req/s", "tok/s", "p50 s", "p99 s"],
                           [[results["requests"], results["ok"], server_errors, results["throughput_req_s"],
                             results["throughput_tok_s"], results["latency_p50_s"], results["latency_p99_s"]]])
          + f"\nStatus counts: {dict(statuses)}\n\nServer RSS: {results['rss_before_mb']} MB before, "
          f"{results['rss_after_mb']} MB after, {results['rss_peak_mb']} MB peak; "
          f"{health['sessions']} sessions held.\n\n"
          + markdown_table(["request kind", "ok", "p50 s"], rows))
    for p in write_results("server_load", results, md):
        print("wrote", p)


if __name__ == "__main__":
    main()
