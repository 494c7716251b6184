"""Fuzz and soak `hiermem serve` on loopback, probing /health under the load.

Starts the server in a subprocess (127.0.0.1, a free port, two API keys, sessions persisted to a
temporary folder), then sends ``--requests`` seeded random requests from ``--concurrency`` clients
(malformed JSON, wrong types, huge fields, Unicode edge cases, valid requests, streams the client
cuts, deletes racing on one session, bad routes and keys: see tests/server_fuzz.py) while a probe
asks /health every 50 ms. Reported: requests and answers by category, 4xx/5xx/transport-error
counts (target: zero 5xx and zero transport errors), /health latency percentiles, the server's RSS
(warm, after, peak), tracebacks in its log, and whether every session file it wrote loads.

    python benchmarks/bench_server_fuzz.py                       # default model, 1000 requests
    python benchmarks/bench_server_fuzz.py --tiny --requests 3000 # tiny random model (HTTP layer only)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]
import server_fuzz  # noqa: E402
from bench_server_load import free_port, percentile  # noqa: E402
from common import machine, markdown_table, print_header, write_results  # noqa: E402

KEYS = {"bench-a": "sk-bench-a-0123456789abcdef", "bench-b": "sk-bench-b-fedcba9876543210"}
BODY_LIMIT_KB = 256


def start_server(args, folder: Path) -> tuple[subprocess.Popen, str]:
    keys = folder / "keys.txt"
    keys.write_text("".join(f"{n} {k}\n" for n, k in KEYS.items()))
    keys.chmod(0o600)
    port = free_port()
    cmd = [sys.executable, "-m", "hiermem.cli", "serve", "--port", str(port), "--api-keys-file", str(keys),
           "--session-dir", str(folder / "sessions"), "--max-sessions", "4", "--max-concurrency",
           str(args.max_concurrency), "--max-queue", str(args.max_queue), "--queue-timeout", "120",
           "--max-body-kb", str(BODY_LIMIT_KB), "--max-tokens-limit", "64", "--max-prompt-tokens", "2000",
           "--device", "cpu", "--model", args.model]
    env = {k: v for k, v in os.environ.items() if k != "HIERMEM_API_KEY"}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(base + "/health").status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled default model)")
    ap.add_argument("--tiny", action="store_true", help="serve the tiny random test model instead")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-concurrency", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=16)
    args = ap.parse_args()
    if not 10 <= args.requests <= 20000 or args.concurrency < 1:
        raise SystemExit("--requests must be in [10, 20000] and --concurrency >= 1")
    work = Path(tempfile.mkdtemp(prefix="hiermem-fuzz-"))
    if args.tiny:
        from tiny import tiny_model_folder

        args.model = str(tiny_model_folder(work))
    elif args.model is None:
        from hiermem.models import model_folder

        folder = model_folder(None)
        args.model = str(folder) if folder else None
    if args.model is None:
        raise SystemExit("no default model installed: pass --model FOLDER or --tiny")
    info = machine(torch.device("cpu"))
    print_header(f"server fuzz: {args.requests} requests, {args.concurrency} clients", info)
    server, base = start_server(args, work)
    model_name = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEYS['bench-a']}"}
                           ).json()["data"][0]["id"]
    fuzz = server_fuzz.Fuzzer(seed=args.seed, model=model_name, body_limit=BODY_LIMIT_KB << 10)
    cases = fuzz.cases(args.requests)
    proc = psutil.Process(server.pid)
    probes, peak, done = [], [proc.memory_info().rss], threading.Event()

    def probe():  # /health every 50 ms, on its own connection
        with httpx.Client(base_url=base, timeout=30) as h:
            while not done.wait(0.05):
                start = time.perf_counter()
                try:
                    ok = h.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                probes.append((time.perf_counter() - start, ok))
                peak.append(proc.memory_info().rss)

    prober = threading.Thread(target=probe, daemon=True)
    start = time.monotonic()
    try:
        warm_n = max(1, len(cases) // 10)
        results = asyncio.run(server_fuzz.drive(base, cases[:warm_n], KEYS["bench-a"], args.concurrency, 300))
        rss_warm = proc.memory_info().rss
        prober.start()
        results += asyncio.run(server_fuzz.drive(base, cases[warm_n:], KEYS["bench-a"], args.concurrency, 300))
        done.set()
        prober.join()
        time.sleep(1.0)
        rss_after = proc.memory_info().rss
        wall = time.monotonic() - start
    finally:
        done.set()
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    from hiermem.errors import CheckpointError
    from hiermem.io import load_tensors

    files = [p for p in (work / "sessions").rglob("*") if p.is_file()]
    broken = []
    for p in files:
        try:
            if p.name.startswith(".") or load_tensors(p)[1].get("kind") != "hiermem-session":
                broken.append(p.name)
        except CheckpointError:
            broken.append(p.name)
    statuses = Counter(str(r.status) for r in results)
    by_category = {c: dict(Counter(str(r.status) for r in results if r.category == c))
                   for c in server_fuzz.CATEGORIES}
    latencies = [t for t, _ in probes]
    counts = {"2xx": sum(n for s, n in statuses.items() if s.startswith("2")),
              "4xx": sum(n for s, n in statuses.items() if s.startswith("4")),
              "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
              "transport_errors": sum(n for s, n in statuses.items() if not s.isdigit())}
    data = {"cases": len(cases), "answers": len(results), "wall_s": round(wall, 1), **counts,
            "statuses": dict(statuses), "by_category": by_category,
            "health_probes": len(probes), "health_failures": sum(1 for _, ok in probes if not ok),
            "health_p50_ms": round(1000 * percentile(latencies, 0.5), 1),
            "health_p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "health_max_ms": round(1000 * max(latencies, default=float("nan")), 1),
            "rss_warm_mb": round(rss_warm / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
            "rss_peak_mb": round(max(peak) / 2**20, 1), "server_tracebacks": err.count("Traceback"),
            "session_files": len(files), "session_files_unreadable": broken,
            "model": model_name if not args.tiny else "tiny random test model", "machine": info,
            "config": {k: v for k, v in vars(args).items() if k != "model"}}
    print({k: v for k, v in data.items() if k not in ("machine", "by_category")})
    rows = [[c, sum(v.values()), ", ".join(f"{s}: {n}" for s, n in sorted(v.items()))]
            for c, v in by_category.items()]
    md = (f"# Server fuzz and soak\n\n`{info['command']}`  \n{info['cpu']}, load average {info['load_average']}\n\n"
          f"{len(cases)} seeded cases (seed {args.seed}) from {args.concurrency} clients on loopback against "
          f"`hiermem serve` ({data['model']}, {args.max_concurrency} workers, queue {args.max_queue}, body limit "
          f"{BODY_LIMIT_KB} KiB, two API keys, sessions persisted); {len(results)} answers in {data['wall_s']} s.\n\n"
          + markdown_table(["2xx", "4xx", "5xx", "transport errors", "/health p50 ms", "/health p99 ms",
                            "/health max ms", "server tracebacks"],
                           [[counts["2xx"], counts["4xx"], counts["5xx"], counts["transport_errors"],
                             data["health_p50_ms"], data["health_p99_ms"], data["health_max_ms"],
                             data["server_tracebacks"]]])
          + f"\n/health was probed {len(probes)} times every 50 ms during the run ({data['health_failures']} "
          f"failures). Server RSS: {data['rss_warm_mb']} MB warm (after the first {warm_n} cases), "
          f"{data['rss_after_mb']} MB after, {data['rss_peak_mb']} MB peak. Session files written: {len(files)}, "
          f"unreadable or half-written: {len(broken)}.\n\n"
          + markdown_table(["category", "answers", "statuses"], rows))
    for p in write_results("server_fuzz", data, md):
        print("wrote", p)


if __name__ == "__main__":
    main()
