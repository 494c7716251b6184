"""``hiermem generate``: text generation with memory from an argument, a file, stdin or a batch file."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys
import time
from pathlib import Path

from hiermem.errors import ConfigError, DataError
from hiermem.inference.generate import GenerationConfig

log = logging.getLogger(__name__)


# fields a JSON line of a batch file may set besides "prompt" and "id": the generate options of the
# same name, for that prompt only (name -> (GenerationConfig field, accepted types))
BATCH_OPTIONS = {"max_new_tokens": ("max_new_tokens", int), "min_new_tokens": ("min_new_tokens", int),
                 "sample": ("do_sample", bool), "temperature": ("temperature", float), "top_k": ("top_k", int),
                 "top_p": ("top_p", float), "repetition_penalty": ("repetition_penalty", float),
                 "seed": ("seed", int), "num_beams": ("num_beams", int), "length_penalty": ("length_penalty", float),
                 "stop": ("stop_strings", list)}


def _batch_options(item: dict, where: str) -> dict:
    """GenerationConfig changes asked for by one JSON line; DataError naming any unknown or mistyped field."""
    unknown = sorted(set(item) - {"prompt", "id", *BATCH_OPTIONS})
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a line may hold \"prompt\", "
                        f"\"id\" and {', '.join(BATCH_OPTIONS)}")
    changes = {}
    for name, (field_name, kind) in BATCH_OPTIONS.items():
        if name not in item:
            continue
        value = item[name]
        if name == "stop" and isinstance(value, str):
            value = [value]
        ok = (isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is list else
              isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not ok:
            raise DataError(f"{where}: field {name!r} must be {'strings' if kind is list else kind.__name__}, "
                            f"got {value!r}")
        changes[field_name] = value
    return changes


def read_batch(path: str | Path) -> list[dict]:
    """Prompts from a file: JSON lines (``{"prompt": ..., "id": ..., "max_new_tokens": ...}`` or a
    JSON string per line) or plain text, one prompt per line (empty lines skipped).

    Returns one dict per prompt: ``prompt``, ``id`` (when given; carried into the output) and
    ``options`` (GenerationConfig changes for this prompt, see ``BATCH_OPTIONS``).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"batch file {path} is a folder; pass a file with one prompt per line")
    if not path.is_file():
        raise DataError(f"batch file not found: {path}")
    from hiermem.data.sources import read_text_file

    items = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", '"')):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc}); write one JSON object per line") from exc
            item = item if isinstance(item, dict) else {"prompt": item}
            if not isinstance(item.get("prompt"), str) or not item["prompt"]:
                raise DataError(f"{path}:{n}: expected a non-empty string or an object with a \"prompt\" string")
            entry = {"prompt": item["prompt"], "options": _batch_options(item, f"{path}:{n}"), "line": n}
            if "id" in item:
                entry["id"] = item["id"]
            items.append(entry)
        else:
            items.append({"prompt": line, "options": {}, "line": n})
    if not items:
        raise DataError(f"{path} holds no prompts")
    return items


def check_port(host: str, port: int) -> None:
    """ConfigError unless ``host:port`` can be bound now (checked before a server loads its model)."""
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind {host!r}: {exc.strerror}; pass an address of this machine with --host") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            sock.bind(address)
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise ConfigError(f"port {port} on {host} {why}; stop what holds it or pick another with --port") from exc


def _prompt_file_text(prompt_file: str) -> str:
    path = Path(prompt_file)
    if path.is_dir():
        raise DataError(f"prompt file {path} is a folder; pass a text file (or - for stdin)")
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    from hiermem.data.sources import read_text_file

    return read_text_file(path)  # binary, non-UTF-8 or empty files: a one-line DataError


def _single_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        text = prompt
    elif prompt_file not in (None, "-"):
        text = _prompt_file_text(prompt_file)
    elif prompt_file == "-" or not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise ConfigError("no prompt: pass --prompt TEXT, --prompt-file FILE, --batch-file FILE, or pipe text in")
    if not text.strip():
        raise ConfigError("the prompt is empty")
    return text


def generate(prompt: str | None = None, model: str | None = None, prompt_file: str | None = None,
             batch_file: str | None = None, output: str | None = None, max_new_tokens: int = 128,
             min_new_tokens: int = 0, sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, stop: list[str] | None = None, ignore_eos: bool = False,
             stream: bool = True, device: str | None = None, dtype: str | None = None) -> int:
    """Generate text with memory; prompts longer than one segment are read through memory.

    The prompt comes from --prompt, --prompt-file (- for stdin) or piped stdin; the completion is
    streamed to the terminal. --batch-file reads many prompts (one per line, or JSON lines with a
    "prompt" field, optionally an "id" copied to the output and per-prompt options named like the
    ones below, e.g. "max_new_tokens", "temperature", "stop") and writes one JSON line per prompt
    to --output (default: stdout).

    Args:
        prompt: prompt text
        model: checkpoint folder, quantized folder or released weights name (default: bundled default)
        prompt_file: file holding the prompt ("-" for stdin)
        batch_file: file of prompts for batch mode
        output: file to write the completion (or, in batch mode, the JSON lines) to
        max_new_tokens: most tokens to generate
        min_new_tokens: fewest tokens before EOS may end the output
        sample: sample instead of greedy decoding
        temperature: sampling temperature
        top_k: sample among the k most likely tokens (0: all)
        top_p: nucleus sampling mass
        repetition_penalty: penalty on tokens already present (1.0: none)
        seed: random seed for sampling
        num_beams: beam search with this many beams (greedy when 1)
        length_penalty: beam score exponent on the output length
        stop: strings that end the output (not included in it)
        ignore_eos: keep generating past end-of-sequence tokens
        stream: print tokens as they are produced
        device: cpu, cuda or auto
        dtype: float32, bfloat16, float16 or auto
    """
    from hiermem.inference.runtime import eos_token_ids, load_for_inference
    from hiermem.inference.sessions import Session

    # everything that can be wrong with the arguments is found before the model loads
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=sample,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, num_beams=num_beams,
                           length_penalty=length_penalty, stop_strings=list(stop or []))
    if batch_file is None:
        text = _single_prompt(prompt, prompt_file)
    elif prompt is not None or prompt_file is not None:
        raise ConfigError("--batch-file replaces --prompt/--prompt-file; give one or the other")
    items = read_batch(batch_file) if batch_file else []
    for item in items:
        try:
            dataclasses.replace(cfg, **item["options"])
        except ConfigError as exc:
            raise ConfigError(f"{batch_file}:{item['line']}: {exc}") from None
    hmt, tokenizer = load_for_inference(model, device=device, dtype=dtype)
    cfg = dataclasses.replace(cfg, eos_token_id=[] if ignore_eos else eos_token_ids(hmt, tokenizer))
    if batch_file:
        return _run_batch(hmt, tokenizer, items, cfg, output)
    live = stream and output is None
    session = Session(hmt)
    start = time.perf_counter()
    on_text = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if live else None
    reply = session.complete(tokenizer, text, cfg, on_text=on_text)
    elapsed = time.perf_counter() - start
    if output is not None:
        Path(output).write_text(reply.text, encoding="utf-8")
    elif not live:
        sys.stdout.write(reply.text)
    sys.stdout.write("\n")
    print(f"[{reply.prompt_tokens} prompt + {reply.completion_tokens} generated tokens in {elapsed:.1f} s, "
          f"finish: {reply.finish_reason}, memory: {session.decoder.stats()}]", file=sys.stderr)
    return 0


def _run_batch(hmt, tokenizer, items: list[dict], cfg: GenerationConfig, output: str | None) -> int:
    """Each prompt gets a fresh memory and its own options; results are written as they complete."""
    from hiermem.inference.sessions import Session

    sink = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115 (closed below)
    try:
        for i, item in enumerate(items):
            reply = Session(hmt).complete(tokenizer, item["prompt"], dataclasses.replace(cfg, **item["options"]))
            record = {"index": i, **({"id": item["id"]} if "id" in item else {}), "prompt": item["prompt"],
                      "completion": reply.text, "finish_reason": reply.finish_reason,
                      "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            log.info("prompt %d/%d done (%d tokens, %s)", i + 1, len(items), reply.completion_tokens,
                     reply.finish_reason)
    finally:
        if output:
            sink.close()
    return 0
