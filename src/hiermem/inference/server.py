"""``hiermem serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with per-session memory.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (both stream server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /health``, and ``GET`` / ``DELETE
/v1/sessions/{id}``.

Memory sessions: a request naming a ``session_id`` (a body field, which the ``openai`` client sends
with ``extra_body``, or the ``X-Session-Id`` header) continues that session's memory; chat requests
may resend the whole conversation or only the new messages. Requests of one session run one at a
time; different sessions run concurrently on ``max_concurrency`` worker threads (torch releases
the GIL), with at most ``max_queue`` requests waiting: beyond that the answer is 429, and a request
that waits longer than ``queue_timeout_s`` gets 503. Responses carry the session's memory
statistics under ``"hiermem"``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from hiermem.errors import ConfigError, HiermemError
from hiermem.inference import openai_api as api
from hiermem.inference.generate import GenerationConfig
from hiermem.inference.runtime import ChatFormat, eos_token_ids
from hiermem.inference.sessions import Session, SessionLimitError, SessionStore

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServerSettings:
    """Limits and policies of the server (all enforced per process)."""

    model_name: str = "hiermem"
    api_key: str | None = None
    max_sessions: int = 64
    session_ttl_s: float = 3600.0
    session_memory_bytes: int = 1 << 30
    session_dir: str | None = None
    max_concurrency: int = 2
    max_queue: int = 16
    queue_timeout_s: float = 30.0
    max_tokens_limit: int = 2048
    max_prompt_tokens: int = 32768
    max_body_bytes: int = 4 << 20
    default_chat_tokens: int = 256

    def __post_init__(self):
        for name in ("max_concurrency", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.queue_timeout_s <= 0:
            raise ConfigError("max_queue must be >= 0 and queue_timeout_s > 0")


@dataclass(eq=False)
class _Job:
    session: Session
    cancel: threading.Event
    release: object  # () -> None, called once the worker is done


class HiermemServer:
    """The model, its sessions and the admission policy behind the FastAPI app."""

    def __init__(self, model, tokenizer, settings: ServerSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.format = ChatFormat(tokenizer)
        self.eos = eos_token_ids(model, tokenizer)
        self.store = SessionStore(model, settings.max_sessions, settings.session_ttl_s,
                                  settings.session_memory_bytes, settings.session_dir)
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="hiermem-gen")
        self.slots: asyncio.Semaphore | None = None
        self.jobs: set[_Job] = set()
        self.waiting = 0
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set at startup

    # --- admission ----------------------------------------------------------------------------
    async def admit(self, session_id: str | None) -> _Job:
        """Reserve the session and a worker, or answer 429 (queue full) / 503 (waited too long)."""
        s = self.settings
        if self.closing:
            raise api.ApiError(503, "the server is shutting down; retry on another instance", "server_error",
                               code="shutting_down")
        if self.slots is None:
            self.slots = asyncio.Semaphore(s.max_concurrency)
        if self.waiting + len(self.jobs) >= s.max_concurrency + s.max_queue:
            raise api.ApiError(429, f"too many requests in flight ({s.max_concurrency} running, {s.max_queue} "
                               "waiting); retry later", "rate_limit_error", code="rate_limit_exceeded")
        self.waiting += 1
        session = None
        try:
            try:
                session = self.store.checkout(session_id) if session_id else Session(self.model)
            except SessionLimitError as exc:
                raise api.ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded") from exc
            loop = asyncio.get_running_loop()
            deadline = loop.time() + s.queue_timeout_s
            await asyncio.wait_for(session.lock.acquire(), s.queue_timeout_s)
            try:
                await asyncio.wait_for(self.slots.acquire(), max(0.0, deadline - loop.time()))
            except BaseException:
                session.lock.release()
                raise
        except asyncio.TimeoutError:
            self._checkin(session_id, session)
            raise api.ApiError(503, f"server busy: no worker became free within {s.queue_timeout_s:g} s; retry later",
                               "server_error", code="server_overloaded") from None
        except BaseException:
            self._checkin(session_id, session)
            raise
        finally:
            self.waiting -= 1
        job = _Job(session, threading.Event(), None)

        def release():
            self.jobs.discard(job)
            self.slots.release()
            session.lock.release()
            self._checkin(session_id, session)

        job.release = release
        self.jobs.add(job)
        return job

    def _checkin(self, session_id, session) -> None:
        if session_id and session is not None:
            self.store.checkin(session)

    def run(self, job: _Job, work, on_text=None) -> asyncio.Future:
        """Run ``work(session, should_stop, on_text)`` on a worker; the job is released when it ends."""
        loop = asyncio.get_running_loop()

        def call():
            reply = work(job.session, job.cancel.is_set, on_text)
            return reply, job.session.stats()

        future = loop.run_in_executor(self.pool, call)

        def done(f):
            job.release()
            if not f.cancelled():
                f.exception()  # retrieved here; the handler reports it

        future.add_done_callback(done)
        return future

    # --- requests -----------------------------------------------------------------------------
    def config(self, req: api.Sampling, max_tokens: int | None, default_tokens: int,
               extra_stops: list[str]) -> GenerationConfig:
        s = self.settings
        if req.model != s.model_name:
            raise api.ApiError(404, f"the model {req.model!r} does not exist; this server serves {s.model_name!r}",
                               param="model", code="model_not_found")
        unsupported = {"n": req.n != 1, "logprobs": bool(req.logprobs), "frequency_penalty": req.frequency_penalty != 0,
                       "presence_penalty": req.presence_penalty != 0}
        for name, bad in unsupported.items():
            if bad:
                hint = "; use repetition_penalty" if name.endswith("penalty") else ""
                raise api.ApiError(400, f"{name} is not supported by this server{hint}", param=name)
        tokens = max_tokens if max_tokens is not None else min(default_tokens, s.max_tokens_limit)
        if tokens > s.max_tokens_limit:
            raise api.ApiError(400, f"max_tokens is {tokens}, above this server's limit of {s.max_tokens_limit}",
                               param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not x for x in stops):
            raise api.ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        if req.num_beams > 1 and req.temperature > 0 and req.temperature != 1.0:
            raise api.ApiError(400, "beam search is deterministic: use num_beams with temperature 0 or 1",
                               param="num_beams")
        try:
            return GenerationConfig(max_new_tokens=tokens, min_new_tokens=min(req.min_tokens, tokens),
                                    do_sample=req.temperature > 0 and req.num_beams == 1,
                                    temperature=req.temperature or 1.0, top_k=req.top_k, top_p=req.top_p,
                                    repetition_penalty=req.repetition_penalty, seed=req.seed,
                                    eos_token_id=self.eos, stop_strings=stops + extra_stops,
                                    num_beams=req.num_beams)
        except ConfigError as exc:
            raise api.ApiError(400, str(exc)) from exc

    def check_prompt(self, text: str) -> None:
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > self.settings.max_prompt_tokens:
            raise api.ApiError(400, f"the prompt has {n} tokens, above this server's limit of "
                               f"{self.settings.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        if n == 0:
            raise api.ApiError(400, "the prompt is empty", param="prompt")

    async def completion(self, req: api.CompletionRequest, session_id: str | None):
        if req.echo or req.suffix:
            raise api.ApiError(400, "echo and suffix are not supported by this server",
                               param="echo" if req.echo else "suffix")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise api.ApiError(400, "send one prompt per request (requests run concurrently)", param="prompt")
        cfg = self.config(req, req.max_tokens, 16, [])
        self.check_prompt(prompts[0])

        def work(session, should_stop, on_text):
            return session.complete(self.tokenizer, prompts[0], cfg, on_text, should_stop)

        return await self.respond(req, session_id, work, chat=False)

    async def chat(self, req: api.ChatRequest, session_id: str | None):
        messages = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                content = m.content
            elif all(p.type == "text" and p.text is not None for p in m.content):
                content = "".join(p.text for p in m.content)
            else:
                raise api.ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
            messages.append({"role": m.role, "content": content})
        cfg = self.config(req, req.max_completion_tokens or req.max_tokens, self.settings.default_chat_tokens,
                          self.format.stop_strings)
        self.check_prompt(self.format.render(messages, add_generation_prompt=True))

        def work(session, should_stop, on_text):
            return session.chat(self.tokenizer, self.format, messages, cfg, on_text, should_stop)

        return await self.respond(req, session_id, work, chat=True)

    async def respond(self, req: api.Sampling, session_id: str | None, work, chat: bool):
        if session_id is not None:
            try:
                SessionStore.check_id(session_id)
            except ConfigError as exc:
                raise api.ApiError(400, str(exc), param="session_id") from exc
        job = await self.admit(session_id)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": self.settings.model_name}
        if not req.stream:
            future = self.run(job, work)
            try:
                reply, stats = await asyncio.shield(future)
            except asyncio.CancelledError:
                job.cancel.set()  # the client went away: stop generating
                raise
            except HiermemError as exc:
                raise api.ApiError(400, str(exc)) from exc
            return JSONResponse(api.body(meta, chat, reply, stats, session_id))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(piece: str):
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        future = self.run(job, work, on_text=push)
        future.add_done_callback(lambda f: queue.put_nowait(f))
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(self._events(meta, chat, queue, job, usage, session_id),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, meta, chat: bool, queue: asyncio.Queue, job: _Job, usage: bool, session_id):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**meta, "object": kind, "choices": [choice]}

        try:
            if chat:
                yield api.sse(chunk(None, role=True))
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield api.sse(chunk(item))
                    continue
                if item.cancelled() or item.exception() is not None:
                    exc = None if item.cancelled() else item.exception()
                    if exc is not None and not isinstance(exc, HiermemError):
                        log.error("generation failed", exc_info=exc)
                    err = api.ApiError(400, str(exc)) if isinstance(exc, HiermemError) else \
                        api.ApiError(500, "generation failed; see the server log", "server_error")
                    yield api.sse(err.body())
                    break
                reply, stats = item.result()
                yield api.sse({**chunk(None, api.FINISH[reply.finish_reason]),
                               "hiermem": api.extension(session_id, stats, reply.finish_reason)})
                if usage:
                    yield api.sse({**meta, "object": kind, "choices": [], "usage": api.usage(reply)})
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # finished, or the client went away: the worker stops at the next token

    def drain(self, grace_s: float) -> None:
        """Shutdown has begun (any thread): refuse new requests, and cancel the running ones a little
        before ``grace_s`` runs out so that they end with a proper response instead of a cut."""
        self.closing = True
        if self.loop is not None and not self.loop.is_closed():
            def cancel_all():
                for job in list(self.jobs):
                    job.cancel.set()

            self.loop.call_soon_threadsafe(self.loop.call_later, max(0.0, 0.8 * grace_s - 0.2), cancel_all)

    async def shutdown(self) -> None:
        """Stop admitting, cancel what still runs, wait for the workers, persist the sessions."""
        self.closing = True
        for job in list(self.jobs):
            job.cancel.set()
        await asyncio.get_running_loop().run_in_executor(None, self.pool.shutdown, True)
        self.store.close()
        log.info("server stopped cleanly")


def create_app(model, tokenizer, settings: ServerSettings | None = None, **overrides):
    """The FastAPI app serving ``model`` (an already-built memory model) with ``tokenizer``.

    ``overrides`` set :class:`ServerSettings` fields (e.g. ``api_key=...``, ``max_concurrency=4``).
    """
    settings = settings or ServerSettings()
    if overrides:
        settings = ServerSettings(**{**settings.__dict__, **overrides})
    server = HiermemServer(model, tokenizer, settings)

    @asynccontextmanager
    async def lifespan(app):
        server.loop = asyncio.get_running_loop()
        yield
        await server.shutdown()

    app = FastAPI(title="hiermem", description="OpenAI-compatible API over a memory model", lifespan=lifespan)
    app.state.hiermem = server

    def auth(request: Request):
        key = settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise api.ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise api.ApiError(401, "incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(api.ApiError)
    async def api_error(request, exc: api.ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(api.ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(api.ApiError(400, str(exc.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        error = api.ApiError(500, "internal error; see the server log", "server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "shutting_down" if server.closing else "ok", "model": settings.model_name,
                "sessions": len(server.store.sessions), "active": len(server.jobs), "waiting": server.waiting}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "hiermem"}]}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        req = await api.read_json(request, api.CompletionRequest, settings.max_body_bytes)
        return await server.completion(req, req.session_id or request.headers.get("x-session-id"))

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        req = await api.read_json(request, api.ChatRequest, settings.max_body_bytes)
        return await server.chat(req, req.session_id or request.headers.get("x-session-id"))

    @app.get("/v1/sessions/{session_id}", dependencies=[Depends(auth)])
    async def session_stats(session_id: str):
        session = server.store.get(_valid_id(session_id))
        if session is None:
            raise api.ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session", "memory": session.stats()}

    @app.delete("/v1/sessions/{session_id}", dependencies=[Depends(auth)])
    async def session_delete(session_id: str):
        held = server.store.sessions.get(_valid_id(session_id))
        if held is not None and held.pins:
            raise api.ApiError(409, f"session {session_id!r} is in use; retry when its request is done",
                               param="session_id", code="session_busy")
        if not server.store.delete(session_id):
            raise api.ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    return app


def _valid_id(session_id: str) -> str:
    try:
        return SessionStore.check_id(session_id)
    except ConfigError as exc:
        raise api.ApiError(400, str(exc), param="session_id") from exc


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, shutdown_grace_s: float = 5.0):
    """Serve ``app`` from a background thread; yields the base URL and stops gracefully on exit."""
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                    timeout_graceful_shutdown=shutdown_grace_s))
    thread = threading.Thread(target=server.run, name="hiermem-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"the server did not start on {host}:{port} (port in use?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=shutdown_grace_s + 30)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown begins (see :meth:`HiermemServer.drain`)."""

    def handle_exit(self, sig, frame):
        hiermem = getattr(getattr(self.config.app, "state", None), "hiermem", None)
        if hiermem is not None and not self.should_exit:
            hiermem.drain(self.config.timeout_graceful_shutdown or 0.0)
        super().handle_exit(sig, frame)


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_sessions: int = 64, session_ttl: float = 3600.0,
          session_memory_mb: int = 1024, session_dir: str | None = None, max_concurrency: int = 2,
          max_queue: int = 16, queue_timeout: float = 30.0, max_tokens_limit: int = 2048,
          max_prompt_tokens: int = 32768, shutdown_grace: float = 10.0, threads: int | None = None,
          device: str | None = None, dtype: str | None = None) -> int:
    """Serve a memory model over an OpenAI-compatible HTTP API with per-session memory.

    POST /v1/completions and /v1/chat/completions (streaming with "stream": true), GET /v1/models,
    GET /health. Pass "session_id" in the body (or the X-Session-Id header) to keep a memory between
    requests. Binds 127.0.0.1 unless told otherwise; set --api-key or HIERMEM_API_KEY to require
    'Authorization: Bearer <key>'. SIGINT/SIGTERM stop it gracefully.

    Args:
        model: checkpoint folder, quantized folder or released weights name (default: bundled default)
        host: address to bind (0.0.0.0 exposes the server to the network)
        port: TCP port
        api_key: required bearer token (default: $HIERMEM_API_KEY; none: no auth)
        model_name: model id clients pass (default: the folder name, or "hiermem")
        max_sessions: memory sessions kept at once (least recently used ones are evicted)
        session_ttl: seconds an idle session is kept
        session_memory_mb: memory all sessions' states may hold together
        session_dir: folder to persist sessions to (evicted ones, and all at shutdown)
        max_concurrency: requests generating at once (worker threads)
        max_queue: requests waiting beyond those (more get HTTP 429)
        queue_timeout: seconds a request may wait for a worker (then HTTP 503)
        max_tokens_limit: largest max_tokens a request may ask for
        max_prompt_tokens: longest prompt in tokens
        shutdown_grace: seconds in-flight requests get to finish at shutdown before they are cancelled
        threads: torch CPU threads (default: CPU cores / max_concurrency, so workers do not oversubscribe)
        device: cpu, cuda or auto
        dtype: float32, bfloat16, float16 or auto
    """
    from hiermem.inference.cli import check_port
    from hiermem.inference.runtime import load_for_inference
    from hiermem.models import model_folder

    check_port(host, port)  # a busy port fails now, not once the model has loaded
    api_key = api_key or os.environ.get("HIERMEM_API_KEY") or None
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set --api-key or HIERMEM_API_KEY)", host)
    folder = model_folder(model)
    settings = ServerSettings(model_name=model_name or (folder.name if folder else "hiermem"), api_key=api_key,
                              max_sessions=max_sessions, session_ttl_s=session_ttl,
                              session_memory_bytes=session_memory_mb << 20, session_dir=session_dir,
                              max_concurrency=max_concurrency, max_queue=max_queue, queue_timeout_s=queue_timeout,
                              max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max_concurrency))
    hmt, tokenizer = load_for_inference(model, device=device, dtype=dtype)
    app = create_app(hmt, tokenizer, settings)
    log.info("serving %r on http://%s:%d (auth %s)", settings.model_name, host, port, "on" if api_key else "off")
    _Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_grace,
                           log_level="info")).run()
    return 0
