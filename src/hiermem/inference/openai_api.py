"""The OpenAI wire format: request schemas (strict types), error bodies, response bodies."""

from __future__ import annotations

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
    model_config = ConfigDict(strict=True, extra="ignore")


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
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    session_id: str | None = None
    num_beams: int = Field(1, ge=1, le=8)
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


async def read_json(request, model_cls, limit: int):
    """Body -> validated request, or an OpenAI-style 4xx."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is {size} bytes, above the limit of {limit}", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"could not parse the JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, str) or p not in ("str", "list[str]"))
        raise ApiError(400, f"{param or 'body'}: {first['msg']} ({exc.error_count()} error(s) in all)",
                       param=param or None) from None
