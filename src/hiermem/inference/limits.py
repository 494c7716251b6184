"""Limits of ``hiermem serve``: the settings (with their defaults) and the checks that answer an
OpenAI-style 4xx when a request goes beyond them.

Every limit bounds the work or memory one request can cost: the body's size and shape, the prompt's
tokens, ``max_tokens``, beams, stop strings (count and length), the chat history a session keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from hiermem.errors import ConfigError
from hiermem.inference.openai_api import ApiError


@dataclass
class ServerSettings:
    """Limits and policies of the server (all enforced per process)."""

    model_name: str = "hiermem"
    api_key: str | None = None  # one key (tenant "default")
    api_keys_file: str | None = None  # many keys, one tenant each (see hiermem.inference.tenants)
    # sessions
    max_sessions: int = 64
    session_ttl_s: float = 3600.0
    session_memory_bytes: int = 1 << 30  # states, KV caches and chat histories of all sessions together
    session_dir: str | None = None
    history_turns: int = 64  # chat turns a session keeps as text (older ones: only in its memory)
    history_bytes: int = 256 << 10  # bytes of chat text a session keeps
    # workers
    max_concurrency: int = 2
    max_queue: int = 16
    queue_timeout_s: float = 30.0
    # requests
    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 30.0  # to receive the whole body (slow senders get 408)
    max_json_values: int = 16384  # values in the body's JSON (objects, lists, strings, numbers...)
    max_messages: int = 1024
    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 2048
    max_stops: int = 4
    max_stop_chars: int = 256
    max_beams: int = 4
    default_chat_tokens: int = 256

    def __post_init__(self):
        positive = ("max_sessions", "session_memory_bytes", "history_turns", "history_bytes", "max_concurrency",
                    "max_body_bytes", "max_json_values", "max_messages", "max_prompt_tokens", "max_tokens_limit",
                    "max_stops", "max_stop_chars", "max_beams", "default_chat_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_queue < 0 or self.queue_timeout_s <= 0 or self.session_ttl_s <= 0 or self.body_timeout_s <= 0:
            raise ConfigError("max_queue must be >= 0; queue_timeout_s, session_ttl_s and body_timeout_s > 0")


def stop_strings(stop, settings: ServerSettings) -> list[str]:
    """The request's ``stop`` as a list, or a 400 beyond ``max_stops`` strings of ``max_stop_chars``."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > settings.max_stops:
        raise ApiError(400, f"stop has {len(stops)} strings; this server takes at most {settings.max_stops}",
                       param="stop", code="too_many_stop_strings")
    for s in stops:
        if not s:
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if len(s) > settings.max_stop_chars:
            raise ApiError(400, f"a stop string has {len(s)} characters; this server takes at most "
                           f"{settings.max_stop_chars}", param="stop", code="stop_string_too_long")
    return stops


def check_tokens(max_tokens: int | None, default: int, num_beams: int, settings: ServerSettings) -> int:
    """The reply length to generate, or a 400 beyond ``max_tokens_limit`` / ``max_beams``."""
    if num_beams > settings.max_beams:
        raise ApiError(400, f"num_beams is {num_beams}, above this server's limit of {settings.max_beams}",
                       param="num_beams")
    tokens = max_tokens if max_tokens is not None else min(default, settings.max_tokens_limit)
    if tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {tokens}, above this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens")
    return tokens


class PromptCounter:
    """Counts a prompt's tokens without unbounded work: text longer than ``limit`` times the
    longest token (in characters) cannot fit and is refused before it is tokenised."""

    def __init__(self, tokenizer, limit: int):
        self.tokenizer, self.limit = tokenizer, limit
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.max_chars = limit * max((len(t) for t in vocab), default=64) + 64
        self.fast = getattr(tokenizer, "_tokenizer", None)  # a Rust tokenizer: counts without the GIL

    def count(self, text: str) -> int:
        if self.fast is not None:
            return len(self.fast.encode_batch([text], add_special_tokens=False)[0])
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check(self, text: str) -> int:
        """Tokens of ``text``, or a 400 when it is empty or longer than ``limit`` tokens."""
        n = self.limit + 1 if len(text) > self.max_chars else self.count(text)
        if n > self.limit:
            more = "more than " if len(text) > self.max_chars else ""
            raise ApiError(400, f"the prompt has {more}{n - (1 if more else 0)} tokens, above this server's limit "
                           f"of {self.limit}", param="prompt", code="context_length_exceeded")
        if n == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return n


__all__ = ["PromptCounter", "ServerSettings", "check_tokens", "stop_strings"]
