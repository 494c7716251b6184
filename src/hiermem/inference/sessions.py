"""Memory sessions: one reader's state (decoder + chat history), saved to one file, kept by a store.

A session file is a safetensors file (written atomically) holding the memory state's tensors
(prefixed ``memory.``), the tokens of the segment in progress (``current``) and, as JSON metadata,
the chat history, the text read so far and the model's fingerprint. Restoring re-reads the
segment in progress through the restored memory, so the memory prompt P* of that segment is
recomputed from its tokens; everything folded into memory is restored bit for bit.

``SessionStore`` keeps sessions by id for the server: LRU order, a TTL, limits on the number of
sessions and on the bytes their states hold, and optional persistence to a folder (sessions
evicted for room, and all of them at shutdown, are written there and come back on next use).
"""

from __future__ import annotations

import asyncio
import logging
import re
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

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
KIND = "hiermem-session"


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


class Session:
    """A decoder (memory + segment in progress), the chat history and the text read so far."""

    def __init__(self, model, decoder=None, history: list[dict] | None = None, transcript: str = "",
                 session_id: str | None = None):
        self.model = model
        self.decoder = decoder if decoder is not None else make_decoder(model, batch_size=1)
        self.history: list[dict] = history or []
        self.transcript = transcript
        self.id = session_id
        self.pending = None  # (1, c) tokens of the segment in progress, restored but not yet re-read
        self.lock = asyncio.Lock()  # the server serialises requests of one session with it
        self.pins = 0  # requests using or waiting for this session (never evicted while > 0)
        self.last_used = time.monotonic()
        self.nbytes = state_nbytes(self.decoder)

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
        self.nbytes = state_nbytes(self.decoder) + (0 if self.pending is None else self.pending.nbytes)

    def reset(self) -> None:
        """Forget everything: fresh memory, empty history."""
        self.pending = None
        self.decoder = make_decoder(self.model, batch_size=1)
        self.history, self.transcript = [], ""
        self.nbytes = state_nbytes(self.decoder)

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.nbytes = state_nbytes(self.decoder)

    def stats(self) -> dict:
        stats = self.decoder.stats()
        if self.pending is not None:
            for key in ("tokens", "current_segment_tokens"):
                stats[key] = stats.get(key, 0) + self.pending.shape[1]
        return {**stats, "turns": sum(m["role"] == "user" for m in self.history), "state_bytes": self.nbytes}

    def new_messages(self, messages: list[dict]) -> list[dict]:
        """The part of ``messages`` this session has not read: a client may resend the whole
        conversation (OpenAI style) or only what is new."""
        n = len(self.history)
        if n and len(messages) > n and [_msg(m) for m in messages[:n]] == self.history:
            return messages[n:]
        return messages

    def chat(self, tokenizer, fmt: ChatFormat, messages: list[dict], cfg: GenerationConfig,
             on_text=None, should_stop=None) -> Reply:
        """Read new chat ``messages`` and generate the assistant's reply (added to the history)."""
        new = [_msg(m) for m in self.new_messages(messages)]
        prompt = fmt.continuation(self.transcript, self.history, new)
        reply = self.complete(tokenizer, prompt, cfg, on_text, should_stop, keep_transcript=True)
        self.history += new + [{"role": "assistant", "content": reply.text}]
        return reply

    def complete(self, tokenizer, prompt: str, cfg: GenerationConfig, on_text=None, should_stop=None,
                 keep_transcript: bool = False) -> Reply:
        """Read ``prompt`` after everything the session has read, then generate.

        ``on_text(piece)`` receives the reply's text as it is produced; ``should_stop()`` is polled
        after every token. The decoder ends holding prompt + every generated token.
        """
        self.ready()
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
        read = prompt + tokenizer.decode(out.tokens[0].tolist(), skip_special_tokens=False)
        self.transcript = self.transcript + read if keep_transcript else ""
        self.touch()
        return Reply(out.text[0], out.finish_reason, ids.shape[1], out.tokens.shape[1])

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
                                     "transcript": self.transcript, "fingerprint": model_fingerprint(self.model)})

    @classmethod
    def load(cls, path: str | Path, model, session_id: str | None = None, lazy: bool = False) -> "Session":
        """Restore a session written by :meth:`save` for this model.

        ``lazy``: leave re-reading the segment in progress to :meth:`ready` (or the next reply)."""
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
        session = cls(model, make_decoder(model, batch_size=1, state=memory), history=list(meta.get("history", [])),
                      transcript=meta.get("transcript", ""), session_id=session_id)
        current = tensors.get("current")
        if current is not None and current.shape[1]:
            session.pending = current
            if not lazy:
                session.ready()
        return session


class SessionLimitError(ConfigError):
    """Every session slot is held by a running request: no room for a new session."""


class SessionStore:
    """Sessions by id with LRU eviction, TTL, count and byte limits, and optional persistence.

    Used from one event loop (no locking of its own). ``checkout`` pins a session (creating or
    restoring it), ``checkin`` unpins it and enforces the limits; pinned sessions are never evicted.
    """

    def __init__(self, model, max_sessions: int = 64, ttl_s: float = 3600.0, max_bytes: int = 1 << 30,
                 directory: str | Path | None = None):
        if max_sessions < 1 or ttl_s <= 0 or max_bytes < 1:
            raise ConfigError("max_sessions, ttl and the session memory limit must be positive")
        self.model = model
        self.max_sessions, self.ttl_s, self.max_bytes = max_sessions, ttl_s, max_bytes
        self.directory = Path(directory) if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise ConfigError("session_id must be 1-128 characters from letters, digits and '_.:-'")
        return session_id

    def path(self, session_id: str) -> Path | None:
        return self.directory / f"{session_id}.safetensors" if self.directory else None

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def get(self, session_id: str) -> Session | None:
        """The session if it is held or persisted (not pinned, not created)."""
        self.expire()
        if session_id in self.sessions:
            return self.sessions[session_id]
        path = self.path(session_id)
        if path is not None and path.exists():
            return self._restore(session_id, path)
        return None

    def checkout(self, session_id: str) -> Session:
        self.check_id(session_id)
        session = self.get(session_id)
        if session is None:
            self._make_room(1)
            session = Session(self.model, session_id=session_id)
            self.sessions[session_id] = session
        self.sessions.move_to_end(session_id)
        session.pins += 1
        return session

    def checkin(self, session: Session) -> None:
        session.pins -= 1
        session.touch()
        self._make_room(0)

    def delete(self, session_id: str) -> bool:
        found = self.sessions.pop(session_id, None) is not None
        path = self.path(session_id)
        if path is not None and path.exists():
            path.unlink()
            found = True
        return found

    def expire(self) -> None:
        """Forget sessions idle for longer than the TTL (held and persisted copies alike)."""
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.pins == 0 and now - s.last_used > self.ttl_s:
                log.info("session %s expired after %.0f s idle", sid, now - s.last_used)
                self.delete(sid)
        if self.directory:
            for path in self.directory.glob("*.safetensors"):
                if time.time() - path.stat().st_mtime > self.ttl_s and path.stem not in self.sessions:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        """Persist every held session (when a folder is set) and forget them."""
        for sid, s in list(self.sessions.items()):
            self._offload(sid, s)
        self.sessions.clear()

    def _restore(self, session_id: str, path: Path) -> Session:
        self._make_room(1)
        try:
            session = Session.load(path, self.model, session_id=session_id, lazy=True)
        except CheckpointError as exc:
            log.warning("dropping unreadable session file %s: %s", path, exc)
            path.unlink(missing_ok=True)
            session = Session(self.model, session_id=session_id)
        self.sessions[session_id] = session
        return session

    def _offload(self, sid: str, session: Session) -> None:
        path = self.path(sid)
        if path is not None:
            session.save(path)
            log.debug("session %s written to %s", sid, path)

    def _make_room(self, incoming: int) -> None:
        """Fit count and bytes (plus ``incoming`` sessions): over the byte budget, idle sessions
        first drop their KV caches (least recently used first), then idle sessions are evicted."""
        self.expire()
        for s in list(self.sessions.values()):
            if self.total_bytes <= self.max_bytes:
                break
            if s.pins == 0 and s.decoder.snapshot()[1].shape[1]:
                s.compact()
        while len(self.sessions) + incoming > self.max_sessions or self.total_bytes > self.max_bytes:
            victim = next((sid for sid, s in self.sessions.items() if s.pins == 0), None)
            if victim is None:
                if len(self.sessions) + incoming > self.max_sessions:
                    raise SessionLimitError(f"all {self.max_sessions} sessions are in use; retry later")
                return  # over the byte budget only through sessions in use: they are let through
            self._offload(victim, self.sessions.pop(victim))


def load_or_new(path: str | Path | None, model) -> Session:
    """The session saved at ``path`` when it exists, else a fresh one."""
    if path is not None and Path(path).exists():
        return Session.load(path, model)
    return Session(model)


__all__ = ["Reply", "Session", "SessionStore", "SessionLimitError", "load_or_new", "model_fingerprint"]
