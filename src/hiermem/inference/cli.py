"""``hiermem generate``: text generation with memory from an argument, a file, stdin or a batch file."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from hiermem.errors import ConfigError, DataError
from hiermem.inference.generate import GenerationConfig

log = logging.getLogger(__name__)


def read_batch(path: str | Path) -> list[str]:
    """Prompts from a file: JSON lines (``{"prompt": ...}`` or a JSON string per line) or plain
    text, one prompt per line (empty lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"batch file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", '"')):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc}); write one JSON object per line") from exc
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str) or not text:
                raise DataError(f"{path}:{n}: expected a non-empty string or an object with a \"prompt\" string")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def _single_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        text = prompt
    elif prompt_file not in (None, "-"):
        path = Path(prompt_file)
        if not path.is_file():
            raise DataError(f"prompt file not found: {path}")
        text = path.read_text(encoding="utf-8")
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
    "prompt" field) and writes one JSON line per prompt to --output (default: stdout).

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

    if batch_file is None:
        text = _single_prompt(prompt, prompt_file)
    elif prompt is not None or prompt_file is not None:
        raise ConfigError("--batch-file replaces --prompt/--prompt-file; give one or the other")
    prompts = read_batch(batch_file) if batch_file else [text]
    hmt, tokenizer = load_for_inference(model, device=device, dtype=dtype)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=sample,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, num_beams=num_beams,
                           length_penalty=length_penalty, stop_strings=list(stop or []),
                           eos_token_id=None if ignore_eos else eos_token_ids(hmt, tokenizer))
    if batch_file:
        return _run_batch(hmt, tokenizer, prompts, cfg, output)
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


def _run_batch(hmt, tokenizer, prompts: list[str], cfg: GenerationConfig, output: str | None) -> int:
    """Each prompt gets a fresh memory; results are written as they complete."""
    from hiermem.inference.sessions import Session

    sink = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115 (closed below)
    try:
        for i, text in enumerate(prompts):
            reply = Session(hmt).complete(tokenizer, text, cfg)
            sink.write(json.dumps({"index": i, "prompt": text, "completion": reply.text,
                                   "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
                                   "completion_tokens": reply.completion_tokens}, ensure_ascii=False) + "\n")
            sink.flush()
            log.info("prompt %d/%d done (%d tokens, %s)", i + 1, len(prompts), reply.completion_tokens,
                     reply.finish_reason)
    finally:
        if output:
            sink.close()
    return 0
