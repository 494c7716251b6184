"""Shared pieces of the benchmark scripts: machine description, fresh-process workers, RSS sampling,
the benchmark text, result files. Benchmarks are not part of the test suite."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def pick_device(name: str | None) -> torch.device:
    """CPU unless CUDA is present (or ``name`` says otherwise)."""
    from hiermem.backbones import resolve_device

    return resolve_device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    """What ran the benchmark: CPU or GPU model, cores, threads, library versions, command line."""
    import transformers

    import hiermem

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "hiermem": hiermem.__version__, "command": " ".join(shlex.quote(a) for a in sys.argv),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_header(title: str, info: dict) -> None:
    print(f"# {title}")
    print(f"command: {info['command']}")
    print(f"machine: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), device "
          f"{info.get('gpu', info['device'])}, load average {info['load_average']}")
    print(f"versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"hiermem {info['hiermem']}")


class RssPeak:
    """Sample this process's resident set size every ``interval`` seconds; ``growth`` = peak - start (MB).

    On CUDA the peak allocated device memory is tracked as well.
    """

    def __init__(self, device: torch.device | None = None, interval: float = 0.005):
        import psutil

        self.proc, self.interval, self.device = psutil.Process(), interval, device
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "RssPeak":
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
        self.start = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20

    def report(self) -> dict:
        out = {"rss_start_mb": round(self.start / 2**20, 1), "rss_peak_mb": round(self.peak / 2**20, 1),
               "rss_growth_mb": round(self.growth_mb, 1)}
        if self.device is not None and self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_growth_mb"] = round((peak - self.cuda_start) / 2**20, 1)
        return out


def lm_train_step(model, opt, ids: torch.Tensor, naive_forward=None) -> None:
    """One optimizer step on the LM loss of ``ids`` (B, T): through ``naive_forward(model, ids)``
    (a reference loop whose first output is the logits) when given, else the model's own forward
    with its auxiliary losses weighted."""
    import torch.nn.functional as F

    if naive_forward is not None:
        logits = naive_forward(model, ids)[0]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        out = model(ids, labels=ids, return_logits=False)
        loss = out.loss + sum(w * out.aux[k] for k, w in model.aux_weights.items() if k in (out.aux or {}))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def lm_read(model, ids: torch.Tensor, naive_forward=None) -> None:
    """Read ``ids`` (B, T) and compute the LM loss, without gradients (same two paths)."""
    import torch.nn.functional as F

    if naive_forward is not None:
        logits = naive_forward(model, ids)[0]
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        model(ids, labels=ids, return_logits=False)


def benchmark_tokens(tokenizer, n: int, source: str = "shakespeare", split: str = "test") -> torch.Tensor:
    """The first ``n`` tokens of the documents of ``split`` of ``source``, in order, joined by blank lines
    (one play for short runs; several plays for 64k tokens)."""
    from hiermem.data import load_documents
    from hiermem.evaluation.loading import tokenize

    ids: list[int] = []
    for doc in load_documents(source, split):
        ids += tokenize(tokenizer, doc.text + "\n\n")
        if len(ids) >= n:
            return torch.tensor(ids[:n], dtype=torch.long)
    if split != "all":
        return benchmark_tokens(tokenizer, n, source, "all")
    raise SystemExit(f"{source} has only {len(ids)} tokens; ask for fewer")


def run_worker(script: Path, args: list[str], timeout: float) -> dict:
    """Run ``script --worker args`` in a fresh interpreter; return the JSON of its last stdout line."""
    cmd = [sys.executable, str(script), "--worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def write_results(name: str, data: dict, markdown: str) -> list[Path]:
    """``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:,.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
