"""Seeded random requests for `hiermem serve` (malformed JSON, wrong types, huge fields, Unicode edge
cases, valid ones, streams cut by the client, deletes racing on one session, bad routes and keys)
and an asyncio driver that sends them concurrently and records every answer.

Shared by tests/test_server_fuzz.py and benchmarks/bench_server_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

CATEGORIES = ("malformed_json", "wrong_types", "huge_fields", "unicode", "valid", "stream_disconnect",
              "concurrent_delete", "bad_routes")
ODD_TEXT = ["\ud800", "\udfff", "a\ud83dz", "\x00", "\u2028\u2029", "\ufeff", "\uffff\ufffe", "\U0010ffff",
            "🦙" * 50, "e\u0301\u0301\u0301", "\u202eevil", "Z\u0351\u0352\u0357\u035b" * 20, "👩‍👩‍👧‍👦",
            "\r\n\r\n", "</s><s>assistant\n", "<|im_end|>", "\x1b[2J", "\\u0000", "%00", "../../etc/passwd"]
WRONG = [None, True, False, -1, 0, 1.5, -0.0, 10**30, -10**30, "", "str", [], [1, "a"], {}, {"a": {"b": []}}]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed", "session_id",
          "num_beams", "stream_options", "n", "logprobs", "min_tokens", "repetition_penalty", "echo"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "messages.0", "messages.0.role", "messages.0.content",
               "messages.0.content.0"]


@dataclass
class Case:
    category: str
    method: str = "POST"
    path: str = "/v1/completions"
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    mode: str = "plain"  # "plain", "disconnect" (read one event, then hang up) or "delete_race"
    session: str | None = None


@dataclass
class Result:
    category: str
    status: int | str  # an HTTP status, or the name of a transport error
    seconds: float


class Fuzzer:
    """Makes :class:`Case` s; ``model`` is the served model id, ``body_limit`` the server's limit."""

    def __init__(self, seed: int = 0, model: str = "hiermem", body_limit: int = 1 << 18, sessions: int = 4):
        self.rng, self.model, self.body_limit, self.sessions = random.Random(seed), model, body_limit, sessions

    def cases(self, n: int) -> list[Case]:
        weights = {"malformed_json": 3, "wrong_types": 3, "huge_fields": 2, "unicode": 3, "valid": 4,
                   "stream_disconnect": 1, "concurrent_delete": 1, "bad_routes": 2}
        kinds = self.rng.choices(list(weights), list(weights.values()), k=n)
        return [getattr(self, kind)() for kind in kinds]

    # --- bodies -------------------------------------------------------------------------------
    def valid_body(self, chat: bool | None = None, stream: bool | None = None, tokens: int = 4) -> dict:
        r = self.rng
        chat = r.random() < 0.5 if chat is None else chat
        body = {"model": self.model, "max_tokens": r.randint(1, tokens), "temperature": r.choice([0, 0.7, 1.0]),
                "stream": r.random() < 0.4 if stream is None else stream, "seed": r.randint(0, 99)}
        if chat:
            body["messages"] = [{"role": "user", "content": r.choice(["Hi", "Tell me a story", "Why?"])}]
        else:
            body["prompt"] = r.choice(["Once upon a time", "The king said", "x"])
        if r.random() < 0.5:
            body["session_id"] = f"s{r.randrange(self.sessions)}"
        if r.random() < 0.2:
            body["stop"] = [r.choice(["\n", "the", "."])]
        if r.random() < 0.1 and not body["stream"]:
            body["num_beams"], body["temperature"] = 2, 0
        return body

    def _post(self, category: str, body, chat: bool, **kw) -> Case:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Case(category, path="/v1/chat/completions" if chat else "/v1/completions", body=raw, **kw)

    def valid(self) -> Case:
        body = self.valid_body()
        return self._post("valid", body, "messages" in body)

    def malformed_json(self) -> Case:
        r = self.rng
        raw = json.dumps(self.valid_body()).encode()
        variants = [raw[:r.randrange(len(raw))], raw + b"}", raw.replace(b":", b"=", 1), b"", b"null", b"[]",
                    b'"just a string"', b"42", b"\xff\xfe\x00{", b"\xef\xbb\xbf" + raw, raw.replace(b'"', b"'"),
                    b"[" * r.randint(100, 100_000), b'{"model": NaN}', b'{"temperature": Infinity}',
                    b'{"a": 1,}', b'{"model": "x", "model": 1}', bytes(r.randrange(256) for _ in range(64)),
                    raw[:-1] + b"\x80\x81}", b'{"prompt": "\\x41"}', b"{" * 5000]
        return self._post("malformed_json", r.choice(variants), r.random() < 0.5)

    def wrong_types(self) -> Case:
        r = self.rng
        chat = r.random() < 0.4
        body = self.valid_body(chat=chat)
        name = r.choice(FIELDS + (CHAT_FIELDS if chat else []))
        target, *path = name.split(".")
        value = r.choice(WRONG)
        if not path:
            body[target] = value
        else:
            node = body[target]
            for step in path[:-1]:
                node = node[int(step)] if isinstance(node, list) else node[step]
            last = path[-1]
            if isinstance(node, list):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
        return self._post("wrong_types", body, chat)

    def huge_fields(self) -> Case:
        r = self.rng
        chat = r.random() < 0.3
        body = self.valid_body(chat=chat, stream=False)
        near = self.body_limit - 200
        pick = r.randrange(11)
        if pick == 0:
            body["prompt" if not chat else "messages"] = ("y" * near if not chat else
                                                          [{"role": "user", "content": "y" * near}])
        elif pick == 1:
            body["prompt" if not chat else "messages"] = ("z " * (self.body_limit // 2) if not chat else
                                                          [{"role": "user", "content": "z"}] * 50_000)
        elif pick == 2:
            body["stop"] = ["s"] * 1000
        elif pick == 3:
            body["stop"] = "t" * 10_000
        elif pick == 4:
            body["max_tokens"] = 10**9
        elif pick == 5:
            body["seed"] = 2**64
        elif pick == 6:
            body["model"] = "m" * 100_000
        elif pick == 7:
            body["session_id"] = "i" * 10_000
        elif pick == 8:
            body["stream_options"] = {f"k{i}": i for i in range(30_000)}
        elif pick == 9:
            body["num_beams"] = 10**6
        else:
            return self._post("huge_fields", body, chat, headers={"X-Session-Id": "h" * 8000})
        return self._post("huge_fields", body, chat)

    def unicode(self) -> Case:
        r = self.rng
        chat = r.random() < 0.5
        body = self.valid_body(chat=chat, stream=r.random() < 0.3)
        text = "".join(r.choice(ODD_TEXT) for _ in range(r.randint(1, 4)))
        where = r.choice(["text", "text", "stop", "session_id", "model", "role", "header"])
        if where == "text":
            if chat:
                body["messages"][0]["content"] = text
            else:
                body["prompt"] = text
        elif where == "stop":
            body["stop"] = [text]
        elif where == "session_id":
            body["session_id"] = text
        elif where == "model":
            body["model"] = text
        elif where == "role" and chat:
            body["messages"][0]["role"] = text
        else:
            value = bytes(b for b in text.encode("utf-8", "replace") if b >= 0x20 and b != 0x7f)  # sendable
            return self._post("unicode", body, chat, headers={"X-Session-Id": value or b"\xe9"})
        return self._post("unicode", json.dumps(body, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass"),
                          chat)

    def stream_disconnect(self) -> Case:
        body = {**self.valid_body(stream=True, tokens=4), "max_tokens": 64, "min_tokens": 64}
        return self._post("stream_disconnect", body, "messages" in body, mode="disconnect")

    def concurrent_delete(self) -> Case:
        sid = f"del-{self.rng.randrange(3)}"
        body = {**self.valid_body(stream=False), "session_id": sid}
        return self._post("concurrent_delete", body, "messages" in body, mode="delete_race", session=sid)

    def bad_routes(self) -> Case:
        r = self.rng
        choices = [Case("bad_routes", "GET", "/v1/completions"), Case("bad_routes", "POST", "/v1/nothing", b"{}"),
                   Case("bad_routes", "PUT", "/v1/sessions/x", b"{}"), Case("bad_routes", "GET", "/v1/sessions/%00"),
                   Case("bad_routes", "GET", "/v1/sessions/" + "a" * 3000),
                   Case("bad_routes", "DELETE", "/v1/sessions/..%2F..%2Fetc"),
                   Case("bad_routes", "GET", "/v1/models", headers={"Authorization": "Bearer " + "k" * 8000}),
                   Case("bad_routes", "GET", "/v1/status", headers={"Authorization": "Basic dXNlcjpwYXNz"}),
                   Case("bad_routes", "POST", "/v1/completions", json.dumps(self.valid_body(chat=False)).encode(),
                        headers={"Authorization": "Bearer wrong-key-123"}),
                   Case("bad_routes", "HEAD", "/health"), Case("bad_routes", "OPTIONS", "/v1/chat/completions")]
        return r.choice(choices)


# --- driver ---------------------------------------------------------------------------------
async def _send(http: httpx.AsyncClient, case: Case, key: str | None) -> list[Result]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
               **case.headers}
    start = time.perf_counter()

    def result(status) -> Result:
        return Result(case.category, status, time.perf_counter() - start)

    try:
        if case.mode == "disconnect":
            async with http.stream(case.method, case.path, content=case.body, headers=headers) as r:
                async for _ in r.aiter_lines():
                    break  # hang up after the first event
                return [result(r.status_code)]
        if case.mode == "delete_race":
            first = await http.request(case.method, case.path, content=case.body, headers=headers)
            path = f"/v1/sessions/{case.session}"
            racers = [http.delete(path, headers=headers) for _ in range(4)] + [
                http.get(path, headers=headers), http.request(case.method, case.path, content=case.body,
                                                              headers=headers)]
            answers = await asyncio.gather(*racers)
            return [result(first.status_code)] + [result(a.status_code) for a in answers]
        r = await http.request(case.method, case.path, content=case.body, headers=headers)
        return [result(r.status_code)]
    except httpx.HTTPError as exc:
        return [result(type(exc).__name__)]


async def drive(base: str, cases: list[Case], key: str | None, concurrency: int = 6,
                timeout: float = 60.0) -> list[Result]:
    """Send ``cases`` with ``concurrency`` clients at a time; every answer is recorded."""
    queue: asyncio.Queue = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)
    results: list[Result] = []

    async def worker():
        async with httpx.AsyncClient(base_url=base, timeout=timeout) as http:
            while not queue.empty():
                results.extend(await _send(http, queue.get_nowait(), key))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def run(base: str, cases: list[Case], key: str | None, concurrency: int = 6) -> list[Result]:
    return asyncio.run(drive(base, cases, key, concurrency))
