"""The OpenAI wire format: request schemas (strict types), body parsing, error and response bodies."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "length"}


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request schemas (strict types: "5" is not a number) ---------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class Sampling(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict | None = None
    session_id: str | None = None
    num_beams: int = Field(1, ge=1)  # the server's max_beams applies
    logprobs: bool | int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class Part(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def extension(session_id, stats: dict, reason: str) -> dict:
    return {"session_id": session_id, "memory": stats, "finish_reason": reason}


def body(meta: dict, chat: bool, reply, stats: dict, session_id) -> dict:
    finish = FINISH[reply.finish_reason]
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": finish}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(reply), "hiermem": extension(session_id, stats, reply.finish_reason)}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def read_body(request, limit: int, timeout_s: float) -> bytes:
    """The request body, or 413 beyond ``limit`` bytes, 408 when it takes longer than ``timeout_s``."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is {size} bytes, above the limit of {limit}", code="body_too_large")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def check_shape(data, max_values: int) -> None:
    """400 unless ``data`` holds at most ``max_values`` JSON values and only valid Unicode text
    (lone surrogates such as "\\ud800" cannot be tokenised). Iterative: any nesting depth is fine."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > max_values:
            raise ApiError(400, f"the JSON body holds more than {max_values} values", code="body_too_complex")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
            count -= len(item)  # a key and its value count as one
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the JSON body holds text that is not valid Unicode (a lone surrogate)",
                               code="invalid_unicode") from None


def parse(raw: bytes, model_cls, max_values: int):
    """Body bytes -> validated request, or an OpenAI-style 400 (CPU work: run it off the event loop)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ApiError(400, f"could not parse the JSON body: {reason}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    check_shape(data, max_values)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, str) or p not in ("str", "list[str]"))
        raise ApiError(400, f"{param or 'body'}: {first['msg']} ({exc.error_count()} error(s) in all)",
                       param=param or None) from None


def shown(value, limit: int = 64) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that echo client input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
