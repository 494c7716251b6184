"""``hiermem chat``: an interactive terminal chat whose memory persists across turns and runs."""

from __future__ import annotations

import logging
import sys
import threading

from hiermem.errors import ConfigError
from hiermem.inference.generate import GenerationConfig

log = logging.getLogger(__name__)

HELP = """commands:
  /reset        forget everything (memory and history)
  /save [FILE]  save the session (to FILE, or to the --session file)
  /stats        memory slots used, tokens seen, turns
  /bad          (models whose memory learns) weaken the memory slots the last answer read
  /help         this text
  /quit         leave (Ctrl+D too); Ctrl+C stops a reply without losing the session"""


class ReplyRunner:
    """Runs one reply in a worker thread so that Ctrl+C stops it between two tokens, leaving the
    session consistent (the partial reply is kept in memory and history)."""

    def __init__(self):
        self.stop = threading.Event()

    def run(self, fn):
        """``fn(should_stop)`` in a worker thread -> (its result, whether Ctrl+C interrupted it)."""
        result, error, finished = {}, {}, threading.Event()

        def work():
            try:
                result["value"] = fn(self.stop.is_set)
            except BaseException as exc:  # re-raised in the caller's thread
                error["exc"] = exc
            finally:
                finished.set()

        self.stop.clear()
        threading.Thread(target=work, name="hiermem-reply", daemon=True).start()
        interrupted = False
        while not finished.is_set():  # an Event, not join(): join() interrupted by Ctrl+C misreports the thread
            try:
                finished.wait(0.1)
            except KeyboardInterrupt:
                self.stop.set()
                interrupted = True
        if "exc" in error:
            raise error["exc"]
        return result["value"], interrupted


def chat(model: str | None = None, session: str | None = None, system: str | None = None,
         max_new_tokens: int = 256, sample: bool = True, temperature: float = 0.7, top_k: int = 50,
         top_p: float = 0.9, repetition_penalty: float = 1.1, seed: int | None = None,
         device: str | None = None, dtype: str | None = None, ltm_state: str | None = None,
         ltm_lr: float | None = None, static_ltm_lr: bool = False, ltm_schedule_steps: int = 100,
         ltm_schedule_min_lr: float = 1e-5, bad_scale: float = 0.5) -> int:
    """Chat in the terminal with a memory model; memory persists across turns (and runs with --session).

    The backbone's chat template is used when its tokenizer has one. With --session FILE the
    memory state and the history are saved to FILE after every turn (atomically) and restored
    on the next run. Type /help for commands; Ctrl+C stops a reply without losing the session.

    Models whose memory learns at run time (hierarchos) learn online: turn n updates the long-term
    memory with a step size on a cosine schedule from --ltm-lr down to --ltm-schedule-min-lr over
    --ltm-schedule-steps turns (then again), or fixed with --static-ltm-lr; /bad weakens the slots
    the last answer read; --ltm-state FILE keeps the learnt memory alone, apart from the weights.

    Args:
        model: checkpoint folder, quantized folder or released weights name (default: bundled default)
        session: session file to restore from and save to after every turn
        system: system prompt for a new conversation
        max_new_tokens: longest reply in tokens
        sample: sample replies (greedy otherwise)
        temperature: sampling temperature
        top_k: sample among the k most likely tokens (0: all)
        top_p: nucleus sampling mass
        repetition_penalty: penalty on tokens already present (1.0: none)
        seed: random seed
        device: cpu, cuda or auto
        dtype: float32, bfloat16, float16 or auto
        ltm_state: file of the learnt long-term memory (and its schedule step), restored at start
            and saved after every turn; not with --session (which holds it already)
        ltm_lr: step size of the memory's update, the schedule's maximum (unset: the model's ltm_lr)
        static_ltm_lr: keep the step size at --ltm-lr instead of the cosine schedule
        ltm_schedule_steps: turns per cosine cycle of the step size
        ltm_schedule_min_lr: smallest step size of the cosine schedule
        bad_scale: share of what was learnt that /bad keeps in the slots the last answer read
    """
    from hiermem.inference.online import online_learning
    from hiermem.inference.runtime import ChatFormat, eos_token_ids, load_for_inference
    from hiermem.inference.sessions import load_or_new

    if ltm_state and session:
        raise ConfigError("use --session (memory and chat) or --ltm-state (the learnt memory alone), not both")
    hmt, tokenizer = load_for_inference(model, device=device, dtype=dtype)
    asked = (ltm_state is not None or ltm_lr is not None or static_ltm_lr or ltm_schedule_steps != 100
             or ltm_schedule_min_lr != 1e-5 or bad_scale != 0.5)
    learning = online_learning(hmt, ltm_lr, static_ltm_lr, ltm_schedule_steps, ltm_schedule_min_lr, bad_scale, asked)
    fmt = ChatFormat(tokenizer)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                           eos_token_id=eos_token_ids(hmt, tokenizer), stop_strings=fmt.stop_strings)
    state = load_or_new(session, hmt)
    state.learning = learning
    where = f", session {session}" if session else ""
    restored = f" (restored: {state.stats()['turns']} turns)" if state.history else ""
    if ltm_state:
        from pathlib import Path

        where = f", learnt memory {ltm_state}"
        if Path(ltm_state).exists():
            learning.load_ltm(state, ltm_state)
            n = state.decoder.state.ltm_steps
            restored = f" (restored: {n} turn{'' if n == 1 else 's'} learnt)"
    runner = ReplyRunner()
    print(f"hiermem chat{where}{restored}. /help for commands, /quit to leave.", flush=True)

    def save(path: str | None) -> None:
        if path:
            state.save(path)
        if ltm_state:
            learning.save_ltm(state, ltm_state)

    while True:
        try:
            sys.stdout.write("> ")  # input()'s own prompt goes to stderr on a terminal
            sys.stdout.flush()
            line = input()
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                print(HELP)
            elif cmd == "/reset":
                state.reset()
                save(session)
                print("memory and history cleared")
            elif cmd == "/save":
                target = arg.strip() or session
                if not target:
                    print("no session file: use /save FILE or start with --session FILE")
                    continue
                state.save(target)
                print(f"saved to {target}")
            elif cmd == "/stats":
                stats = state.stats()
                if learning is not None:
                    stats["next_ltm_lr"] = f"{learning.next_lr(state):.6g}"
                print(" ".join(f"{k}={v}" for k, v in stats.items()))
            elif cmd == "/bad":
                if learning is None:
                    print("/bad needs a model whose memory learns at run time (hierarchos)")
                    continue
                try:
                    n = learning.bad(state)
                except ConfigError as exc:
                    print(f"error: {exc}")
                    continue
                save(session)
                print(f"weakened {n} memory slots the last answer read (kept {bad_scale:g} of what they learnt)")
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        messages = ([{"role": "system", "content": system}] if system and not state.history else [])
        messages.append({"role": "user", "content": line})
        try:
            _, interrupted = runner.run(lambda should_stop, new=messages: state.chat(
                tokenizer, fmt, new, cfg, on_text=_show, should_stop=should_stop))
        except ConfigError as exc:
            print(f"error: {exc}")
            continue
        print(" [interrupted]" if interrupted else "", flush=True)
        save(session)
    save(session)
    if session:
        print(f"session saved to {session}", file=sys.stderr)
    return 0


def _show(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()

