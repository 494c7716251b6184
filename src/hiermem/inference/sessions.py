"""Memory sessions: one reader's state (decoder + chat history), saved to one file, kept by a store.

A session file is a safetensors file (written atomically) holding the memory state's tensors
(prefixed ``memory.``), the tokens of the segment in progress (``current``) and, as JSON metadata,
the chat history, the last reply as it was read and the model's fingerprint. Restoring re-reads
the segment in progress through the restored memory, so the memory prompt P* of that segment is
recomputed from its tokens; everything folded into memory is restored bit for bit.

The chat history kept as text is capped (``history_turns`` turns, ``history_bytes`` bytes of
text): the oldest turns are dropped, the memory state keeps what was read.

``SessionStore`` keeps sessions by key for the server: LRU order, a TTL, limits on the number of
sessions and on the bytes their states and histories hold, and optional persistence to a folder
(sessions evicted for room, and all of them at shutdown, are written there and come back on next
use). A key is ``ID`` or ``NAMESPACE/ID`` (one folder per namespace); it is thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.inference.generate import GenerationConfig, TextStream, generate, make_decoder, state_nbytes
from hiermem.inference.runtime import ChatFormat, encode, text_decoder
from hiermem.io import load_tensors, save_tensors

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # always fullmatch: "abc\n" is not an id
NAMESPACE = re.compile(r"[a-z0-9]{1,64}")
KIND = "hiermem-session"
HISTORY_TURNS = 64  # chat turns a session keeps as text
HISTORY_BYTES = 256 << 10  # bytes of chat text a session keeps


def model_fingerprint(model) -> dict:
    return model.fingerprint()


@dataclass
class Reply:
    text: str  # cut before any stop string, special tokens left out
    finish_reason: str  # "length", "eos", "stop" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


def _msg(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


def _text_bytes(m: dict) -> int:
    return len(m["content"].encode("utf-8", "replace")) + len(m["role"]) + 16


def _history(items, where: str) -> list[dict]:
    if not isinstance(items, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in items):
        raise CheckpointError(f"{where} holds a malformed chat history")
    return [_msg(m) for m in items]


class Session:
    """A decoder (memory + segment in progress), the chat history and the last reply as read."""

    def __init__(self, model, decoder=None, history: list[dict] | None = None, session_id: str | None = None,
                 reply_read: str | None = None, turns: int | None = None, history_turns: int = HISTORY_TURNS,
                 history_bytes: int = HISTORY_BYTES):
        self.model = model
        self.decoder = decoder if decoder is not None else make_decoder(model, batch_size=1)
        self.history: list[dict] = list(history or [])
        self.reply_read = reply_read  # the last reply with its special tokens, as the reader read it
        self.turns = turns if turns is not None else sum(m["role"] == "user" for m in self.history)
        self.history_turns, self.history_bytes = history_turns, history_bytes
        self.id = session_id
        self.pending = None  # (1, c) tokens of the segment in progress, restored but not yet re-read
        self.learning = None  # online learning hooks (models whose state learns), see online.py
        self.answer_from = None  # time of the last answer's first token (online learning's /bad)
        self.lock = asyncio.Lock()  # the server serialises requests of one session with it
        self.pins = 0  # requests using or waiting for this session (never evicted while > 0)
        self.last_used = time.monotonic()
        self._trim()
        self.nbytes = 0
        self.measure()

    def ready(self) -> None:
        """Re-read the restored segment in progress (compute: done in a worker by the server)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.decoder.feed(pending.to(self.model.device))  # P* of that segment is recomputed

    def compact(self) -> None:
        """Drop the KV cache of the segment in progress, keeping its tokens to re-read on next use
        (the store does this to idle sessions before evicting any)."""
        state, current = self.decoder.snapshot()
        if current.shape[1]:
            self.pending = current if self.pending is None else torch.cat([self.pending, current], dim=1)
        self.decoder = make_decoder(self.model, batch_size=1, state=state)
        self.measure()

    def reset(self) -> None:
        """Forget everything: fresh memory, empty history."""
        self.pending = None
        self.decoder = make_decoder(self.model, batch_size=1)
        self.history, self.reply_read, self.turns = [], None, 0
        self.touch()

    @property
    def text_bytes(self) -> int:
        """Bytes of chat text held (history and last reply)."""
        return sum(map(_text_bytes, self.history)) + len((self.reply_read or "").encode("utf-8", "replace"))

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.measure()

    def measure(self) -> None:
        """Update ``nbytes``: state, KV cache, tokens waiting to be re-read, chat text."""
        pending = 0 if self.pending is None else self.pending.nbytes
        self.nbytes = state_nbytes(self.decoder) + pending + self.text_bytes

    def _trim(self) -> None:
        """Drop the oldest turns (up to and including an assistant reply) beyond the history limits."""
        sizes = [_text_bytes(m) for m in self.history]
        kept, size, cut = sum(m["role"] == "user" for m in self.history), sum(sizes), 0
        while cut < len(self.history) and (kept > self.history_turns or size > self.history_bytes):
            end = next((i for i in range(cut, len(self.history)) if self.history[i]["role"] == "assistant"),
                       len(self.history) - 1)
            kept -= sum(m["role"] == "user" for m in self.history[cut:end + 1])
            size -= sum(sizes[cut:end + 1])
            cut = end + 1
        if cut:
            del self.history[:cut]
        if not self.history:
            self.reply_read = None

    def stats(self) -> dict:
        stats = self.decoder.stats()
        if self.pending is not None:
            for key in ("tokens", "current_segment_tokens"):
                stats[key] = stats.get(key, 0) + self.pending.shape[1]
        return {**stats, "turns": self.turns, "history_turns": sum(m["role"] == "user" for m in self.history),
                "history_bytes": self.text_bytes, "state_bytes": self.nbytes}

    def new_messages(self, messages: list[dict]) -> list[dict]:
        """The part of ``messages`` this session has not read: a client may resend the whole
        conversation (OpenAI style; the kept history is then found in it, however many older turns
        were dropped) or only what is new."""
        hist, n = self.history, len(self.history)
        if not n or len(messages) <= n:
            return messages
        msgs = [_msg(m) for m in messages]
        for k in range(len(msgs) - n - 1, -1, -1):  # the latest place the history fits, new messages after
            if msgs[k] == hist[0] and msgs[k + n - 1] == hist[-1] and msgs[k:k + n] == hist:
                return messages[k + n:]
        return messages

    def _transcript(self, fmt: ChatFormat) -> str:
        """What the reader has read of the kept history, as text (empty when unknown)."""
        if self.reply_read is None or not self.history or self.history[-1]["role"] != "assistant":
            return ""
        try:
            return fmt.render(self.history[:-1], add_generation_prompt=True) + self.reply_read
        except ConfigError:
            return ""

    def chat(self, tokenizer, fmt: ChatFormat, messages: list[dict], cfg: GenerationConfig,
             on_text=None, should_stop=None) -> Reply:
        """Read new chat ``messages`` and generate the assistant's reply (added to the history)."""
        new = [_msg(m) for m in self.new_messages(messages)]
        prompt = fmt.continuation(self._transcript(fmt), self.history, new)
        reply = self.complete(tokenizer, prompt, cfg, on_text, should_stop, as_chat=True)
        self.history += new + [{"role": "assistant", "content": reply.text}]
        self.turns += sum(m["role"] == "user" for m in new)
        self._trim()
        self.touch()
        return reply

    def complete(self, tokenizer, prompt: str, cfg: GenerationConfig, on_text=None, should_stop=None,
                 as_chat: bool = False) -> Reply:
        """Read ``prompt`` after everything the session has read, then generate.

        ``on_text(piece)`` receives the reply's text as it is produced; ``should_stop()`` is polled
        after every token. The decoder ends holding prompt + every generated token.
        """
        self.ready()
        if self.learning is not None:
            self.learning.begin(self)  # this turn's step size of the memory's update
        ids = encode(tokenizer, prompt, self.model.device)  # (1, T)
        decode = text_decoder(tokenizer)
        stream = TextStream(decode, cfg.stop_strings) if on_text is not None else None
        eos = cfg.eos_ids

        def on_token(tok):
            t = int(tok[0])
            piece = stream.push(t) if t not in eos else ""
            if piece:
                on_text(piece)

        out = generate(self.model, ids, cfg, decoder=self.decoder, on_token=on_token if stream else None,
                       decode=decode, should_stop=should_stop)
        if stream is not None:
            tail = stream.finish()
            if tail:
                on_text(tail)
        self.reply_read = tokenizer.decode(out.tokens[0].tolist(), skip_special_tokens=False) if as_chat else None
        self.touch()
        reply = Reply(out.text[0], out.finish_reason, ids.shape[1], out.tokens.shape[1])
        if self.learning is not None:
            self.learning.end(self, reply)
        return reply

    def save(self, path: str | Path) -> None:
        """Write the session to one safetensors file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state, current = self.decoder.snapshot()
        if self.pending is not None:
            current = torch.cat([self.pending, current], dim=1)
        mem_tensors, mem_meta = state.to_tensors(fingerprint=model_fingerprint(self.model))
        tensors = {f"memory.{k}": v for k, v in mem_tensors.items()}
        tensors["current"] = current
        save_tensors(path, tensors, {"kind": KIND, "memory": mem_meta, "history": self.history,
                                     "reply_read": self.reply_read, "turns": self.turns,
                                     "fingerprint": model_fingerprint(self.model)})

    @classmethod
    def load(cls, path: str | Path, model, session_id: str | None = None, lazy: bool = False,
             **limits) -> "Session":
        """Restore a session written by :meth:`save` for this model.

        ``lazy``: leave re-reading the segment in progress to :meth:`ready` (or the next reply);
        ``limits``: ``history_turns`` / ``history_bytes`` (the history is cut to them)."""
        path = Path(path)
        tensors, meta = load_tensors(path)
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{path} is not a hiermem session file")
        saved, own = meta.get("fingerprint") or {}, model_fingerprint(model)
        if saved and saved != own:
            raise CheckpointError(f"session {path} was made by a different model ({saved}); this model is "
                                  f"{own}. Start a new session (another file) instead.")
        weight = next(model.parameters())
        memory = model.state_class.from_tensors(
            {k[len("memory."):]: v.to(weight.device) for k, v in tensors.items() if k.startswith("memory.")},
            meta.get("memory", {}), dtype=weight.dtype, fingerprint=own, where=f"session {path}")
        reply_read, turns = meta.get("reply_read"), meta.get("turns")  # files before these: None
        session = cls(model, make_decoder(model, batch_size=1, state=memory),
                      history=_history(meta.get("history", []), f"session {path}"), session_id=session_id,
                      reply_read=reply_read if isinstance(reply_read, str) else None,
                      turns=turns if isinstance(turns, int) else None, **limits)
        current = tensors.get("current")
        if current is not None and current.shape[1]:
            session.pending = current
            session.measure()
            if not lazy:
                session.ready()
        return session


class SessionLimitError(ConfigError):
    """Every session slot is held by a running request: no room for a new session."""


class SessionBusyError(ConfigError):
    """The session is in use by a request (it cannot be deleted now)."""


class SessionStore:
    """Sessions by key with LRU eviction, TTL, count and byte limits, and optional persistence.

    Thread-safe (one lock; disk I/O happens under it, so call it off the event loop). ``checkout``
    pins a session (creating or restoring it), ``checkin`` unpins it and enforces the limits;
    pinned sessions are never evicted. Keys are ``ID`` or ``NAMESPACE/ID``.
    """

    def __init__(self, model, max_sessions: int = 64, ttl_s: float = 3600.0, max_bytes: int = 1 << 30,
                 directory: str | Path | None = None, history_turns: int = HISTORY_TURNS,
                 history_bytes: int = HISTORY_BYTES):
        if max_sessions < 1 or ttl_s <= 0 or max_bytes < 1:
            raise ConfigError("max_sessions, ttl and the session memory limit must be positive")
        self.model = model
        self.max_sessions, self.ttl_s, self.max_bytes = max_sessions, ttl_s, max_bytes
        self.limits = {"history_turns": history_turns, "history_bytes": history_bytes}
        self.directory = Path(directory) if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.learning = None  # online learning given to every session (models whose state learns)
        self.lock = threading.RLock()
        self._swept = float("-inf")  # when the folder was last swept for expired files

    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise ConfigError("session_id must be 1-128 characters from letters, digits and '_.:-'")
        return session_id

    @classmethod
    def key(cls, namespace: str, session_id: str) -> str:
        """The store key of ``session_id`` in ``namespace`` (ConfigError for a bad id)."""
        if not NAMESPACE.fullmatch(namespace):
            raise ConfigError(f"bad session namespace {namespace!r}")
        return f"{namespace}/{cls.check_id(session_id)}"

    @classmethod
    def check_key(cls, key: str) -> str:
        """``key`` if it is ``ID`` or ``NAMESPACE/ID`` (ConfigError otherwise: no path tricks)."""
        namespace, _, sid = key.rpartition("/") if isinstance(key, str) else ("", "", None)
        return cls.key(namespace, sid) if namespace else cls.check_id(sid)

    def path(self, key: str) -> Path | None:
        namespace, _, sid = self.check_key(key).rpartition("/")
        if self.directory is None:
            return None
        return (self.directory / namespace if namespace else self.directory) / f"{sid}.safetensors"

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def get(self, key: str) -> Session | None:
        """The session if it is held or persisted (not pinned, not created)."""
        self.check_key(key)
        with self.lock:
            self.expire()
            if key in self.sessions:
                return self.sessions[key]
            path = self.path(key)
            if path is not None and path.exists():
                return self._restore(key, path)
            return None

    def ids(self, namespace: str) -> list[str]:
        """Session ids of ``namespace``, held or persisted."""
        with self.lock:
            self.expire()
            prefix = f"{namespace}/"
            found = {k[len(prefix):] for k in self.sessions if k.startswith(prefix)}
            folder = self.directory / namespace if self.directory else None
            if folder is not None and folder.is_dir():
                found.update(p.stem for p in folder.glob("*.safetensors") if SESSION_ID.fullmatch(p.stem))
            return sorted(found)

    def checkout(self, key: str) -> Session:
        self.check_key(key)
        with self.lock:
            session = self.get(key)
            if session is None:
                self._make_room(1)
                session = Session(self.model, session_id=key, **self.limits)
                self.sessions[key] = session
            self.sessions.move_to_end(key)
            session.learning = self.learning
            session.pins += 1
            return session

    def checkin(self, session: Session) -> None:
        with self.lock:
            session.pins -= 1
            session.touch()
            self._make_room(0)

    def delete(self, key: str) -> bool:
        """Forget a session (held and persisted copies); SessionBusyError while it is pinned."""
        with self.lock:
            held = self.sessions.get(key)
            if held is not None and held.pins:
                raise SessionBusyError("the session is in use; retry when its request is done")
            found = self.sessions.pop(key, None) is not None
            path = self.path(key)
            if path is not None and path.exists():
                path.unlink(missing_ok=True)
                found = True
            return found

    def expire(self) -> None:
        """Forget sessions idle for longer than the TTL (held ones at every call, persisted files
        at most every ttl/4 seconds, up to a minute)."""
        with self.lock:
            now = time.monotonic()
            for key, s in list(self.sessions.items()):
                if s.pins == 0 and now - s.last_used > self.ttl_s:
                    log.info("session %s expired after %.0f s idle", key, now - s.last_used)
                    self.delete(key)
            if self.directory is None or now - self._swept < min(60.0, self.ttl_s / 4):
                return
            self._swept = now
            for path in [*self.directory.glob("*.safetensors"), *self.directory.glob("*/*.safetensors")]:
                key = path.stem if path.parent == self.directory else f"{path.parent.name}/{path.stem}"
                try:
                    old = time.time() - path.stat().st_mtime > self.ttl_s
                except FileNotFoundError:
                    continue
                if old and key not in self.sessions:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        """Persist every held session (when a folder is set) and forget them."""
        with self.lock:
            for key, s in list(self.sessions.items()):
                self._offload(key, s)
            self.sessions.clear()

    def _restore(self, key: str, path: Path) -> Session:
        self._make_room(1)
        try:
            session = Session.load(path, self.model, session_id=key, lazy=True, **self.limits)
        except CheckpointError as exc:
            log.warning("dropping unreadable session file %s: %s", path, exc)
            path.unlink(missing_ok=True)
            session = Session(self.model, session_id=key, **self.limits)
        self.sessions[key] = session
        return session

    def _offload(self, key: str, session: Session) -> None:
        path = self.path(key)
        if path is not None:
            session.save(path)
            log.debug("session %s written to %s", key, path)

    def _make_room(self, incoming: int) -> None:
        """Fit count and bytes (plus ``incoming`` sessions): over the byte budget, idle sessions
        first drop their KV caches (least recently used first), then idle sessions are evicted."""
        self.expire()
        for s in list(self.sessions.values()):
            if self.total_bytes <= self.max_bytes:
                break
            if s.pins == 0 and s.decoder.holds_cache:
                s.compact()
        while len(self.sessions) + incoming > self.max_sessions or self.total_bytes > self.max_bytes:
            victim = next((key for key, s in self.sessions.items() if s.pins == 0), None)
            if victim is None:
                if len(self.sessions) + incoming > self.max_sessions:
                    raise SessionLimitError(f"all {self.max_sessions} sessions are in use; retry later")
                return  # over the byte budget only through sessions in use: they are let through
            self._offload(victim, self.sessions[victim])  # written first: a failed write loses nothing
            del self.sessions[victim]


def load_or_new(path: str | Path | None, model) -> Session:
    """The session saved at ``path`` when it exists, else a fresh one."""
    if path is not None and Path(path).exists():
        return Session.load(path, model)
    return Session(model)


__all__ = ["Reply", "Session", "SessionBusyError", "SessionLimitError", "SessionStore", "load_or_new",
           "model_fingerprint"]
