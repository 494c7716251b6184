"""``hiermem serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with per-session memory.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (both stream server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /v1/sessions`` (the caller's),
``GET`` / ``DELETE /v1/sessions/{id}``, ``GET /v1/status`` (load and session counts) and the
public liveness probe ``GET /health``.

Memory sessions: a request naming a ``session_id`` (a body field, which the ``openai`` client sends
with ``extra_body``, or the ``X-Session-Id`` header) continues that session's memory; chat requests
may resend the whole conversation or only the new messages. Sessions belong to the API key that
made them (:mod:`hiermem.inference.tenants`). Requests of one session run one at a time; different
sessions run concurrently on ``max_concurrency`` worker threads (torch releases the GIL), with at
most ``max_queue`` requests waiting: beyond that the answer is 429, and a request that waits longer
than ``queue_timeout_s`` gets 503. Parsing, tokenising and session disk I/O run on helper threads,
never on the event loop. Limits: :mod:`hiermem.inference.limits`. Responses carry the session's
memory statistics under ``"hiermem"``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
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
from hiermem.inference.limits import PromptCounter, ServerSettings, check_tokens, stop_strings
from hiermem.inference.runtime import ChatFormat, eos_token_ids
from hiermem.inference.sessions import Session, SessionBusyError, SessionLimitError, SessionStore
from hiermem.inference.tenants import AuthError, KeyRing, Tenant

log = logging.getLogger(__name__)

MODEL_ALIAS = "hiermem"  # always accepted as the model name, besides the served model's own


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class _Job:
    session: Session
    key: str | None  # the store key when the session is kept, else None
    cancel: threading.Event
    checked_in: bool = False


class HiermemServer:
    """The model, its sessions and the admission policy behind the FastAPI app."""

    def __init__(self, model, tokenizer, settings: ServerSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.keys = KeyRing.load(settings.api_key, settings.api_keys_file)
        self.format = ChatFormat(tokenizer)
        self.eos = eos_token_ids(model, tokenizer)
        self.limits = {"history_turns": settings.history_turns, "history_bytes": settings.history_bytes}
        self.store = SessionStore(model, settings.max_sessions, settings.session_ttl_s,
                                  settings.session_memory_bytes, settings.session_dir, **self.limits)
        self.counter = PromptCounter(tokenizer, settings.max_prompt_tokens)
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="hiermem-gen")
        self.io = ThreadPoolExecutor(max(2, settings.max_concurrency), thread_name_prefix="hiermem-io")
        self.slots: asyncio.Semaphore | None = None
        self.jobs: set[_Job] = set()
        self.waiting = 0  # requests admitted but not yet running (reading, parsing, queued)
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set at startup

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on a helper thread (CPU work, disk I/O): the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self.io, functools.partial(fn, *args))

    # --- admission ----------------------------------------------------------------------------
    def enter(self) -> None:
        """Count a new request in, or answer 503 (shutting down) / 429 (too many in flight)."""
        s = self.settings
        if self.closing:
            raise api.ApiError(503, "the server is shutting down; retry on another instance", "server_error",
                               code="shutting_down")
        if self.waiting + len(self.jobs) >= s.max_concurrency + s.max_queue:
            raise api.ApiError(429, f"too many requests in flight ({s.max_concurrency} running, {s.max_queue} "
                               "waiting); retry later", "rate_limit_error", code="rate_limit_exceeded")
        self.waiting += 1

    async def admit(self, key: str | None) -> _Job:
        """Reserve the session and a worker (the caller counts as waiting), or answer 503 when
        none became free in time."""
        s = self.settings
        if self.slots is None:
            self.slots = asyncio.Semaphore(s.max_concurrency)
        session = await self._checkout(key)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + s.queue_timeout_s
            await asyncio.wait_for(session.lock.acquire(), s.queue_timeout_s)
            try:
                await asyncio.wait_for(self.slots.acquire(), max(0.0, deadline - loop.time()))
            except BaseException:
                session.lock.release()
                raise
        except asyncio.TimeoutError:
            self._unpin(key, session)
            raise api.ApiError(503, f"server busy: no worker became free within {s.queue_timeout_s:g} s; retry later",
                               "server_error", code="server_overloaded") from None
        except BaseException:
            self._unpin(key, session)
            raise
        job = _Job(session, key, threading.Event())
        self.jobs.add(job)
        return job

    async def _checkout(self, key: str | None) -> Session:
        if key is None:
            return await self.off_loop(functools.partial(Session, self.model, **self.limits))
        future = asyncio.get_running_loop().run_in_executor(self.io, self.store.checkout, key)
        try:
            return await asyncio.shield(future)
        except SessionLimitError as exc:
            raise api.ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded") from exc
        except asyncio.CancelledError:  # the client left while the session was being restored
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self._unpin(key, f.result()))
            raise

    def _unpin(self, key: str | None, session: Session) -> None:
        if key is not None:
            self.io.submit(self._checkin, session)

    def _checkin(self, session: Session) -> None:
        try:
            self.store.checkin(session)
        except Exception:  # e.g. the disk is full: the session stays held, the reply still goes out
            log.exception("could not check session %s in", session.id)

    def run(self, job: _Job, work, on_text=None) -> asyncio.Future:
        """Run ``work(session, should_stop, on_text)`` on a worker; the job is released when it ends."""
        loop = asyncio.get_running_loop()

        def call():
            try:
                reply = work(job.session, job.cancel.is_set, on_text)
                return reply, job.session.stats()
            finally:
                if job.key is not None:  # on the worker: the store may write evicted sessions to disk
                    self._checkin(job.session)
                    job.checked_in = True

        future = loop.run_in_executor(self.pool, call)

        def done(f):
            self.jobs.discard(job)
            self.slots.release()
            job.session.lock.release()
            if not job.checked_in:  # never ran
                self._unpin(job.key, job.session)
            if not f.cancelled():
                f.exception()  # retrieved here; the handler reports it

        future.add_done_callback(done)
        return future

    # --- requests -----------------------------------------------------------------------------
    def config(self, req: api.Sampling, max_tokens: int | None, default_tokens: int,
               extra_stops: list[str]) -> GenerationConfig:
        s = self.settings
        if req.model not in (s.model_name, MODEL_ALIAS):
            raise api.ApiError(404, f"the model {api.shown(req.model)} does not exist; this server serves "
                               f"{s.model_name!r}", param="model", code="model_not_found")
        unsupported = {"n": req.n != 1, "logprobs": bool(req.logprobs), "frequency_penalty": req.frequency_penalty != 0,
                       "presence_penalty": req.presence_penalty != 0}
        for name, bad in unsupported.items():
            if bad:
                hint = "; use repetition_penalty" if name.endswith("penalty") else ""
                raise api.ApiError(400, f"{name} is not supported by this server{hint}", param=name)
        tokens = check_tokens(max_tokens, default_tokens, req.num_beams, s)
        stops = stop_strings(req.stop, s)
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

    def session_key(self, tenant: Tenant, session_id: str | None) -> str | None:
        if session_id is None:
            return None
        try:
            return SessionStore.key(tenant.namespace, session_id)
        except ConfigError as exc:
            raise api.ApiError(400, str(exc), param="session_id") from exc

    def _chat_messages(self, req: api.ChatRequest) -> list[dict]:
        if len(req.messages) > self.settings.max_messages:
            raise api.ApiError(400, f"the request has {len(req.messages)} messages; this server takes at most "
                               f"{self.settings.max_messages}", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                content = m.content
            elif all(p.type == "text" and p.text is not None for p in m.content):
                content = "".join(p.text for p in m.content)
            else:
                raise api.ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
            messages.append({"role": m.role, "content": content})
        return messages

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.format.render(messages, add_generation_prompt=True)
        except ConfigError as exc:
            raise api.ApiError(400, str(exc), param="messages") from exc

    async def handle(self, request: Request, tenant: Tenant, chat: bool):
        """One completion or chat request, from the raw body to the response."""
        s = self.settings
        self.enter()
        try:
            raw = await api.read_body(request, s.max_body_bytes, s.body_timeout_s)
            req = await self.off_loop(api.parse, raw, api.ChatRequest if chat else api.CompletionRequest,
                                      s.max_json_values)
            session_id = req.session_id or request.headers.get("x-session-id")
            key = self.session_key(tenant, session_id)
            if chat:
                messages = self._chat_messages(req)
                cfg = self.config(req, req.max_completion_tokens or req.max_tokens, s.default_chat_tokens,
                                  self.format.stop_strings)
                await self.off_loop(lambda: self.counter.check(self._render(messages)))

                def work(session, should_stop, on_text):
                    return session.chat(self.tokenizer, self.format, messages, cfg, on_text, should_stop)
            else:
                if req.echo or req.suffix:
                    raise api.ApiError(400, "echo and suffix are not supported by this server",
                                       param="echo" if req.echo else "suffix")
                prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
                if len(prompts) != 1:
                    raise api.ApiError(400, "send one prompt per request (requests run concurrently)",
                                       param="prompt")
                cfg = self.config(req, req.max_tokens, 16, [])
                await self.off_loop(self.counter.check, prompts[0])

                def work(session, should_stop, on_text):
                    return session.complete(self.tokenizer, prompts[0], cfg, on_text, should_stop)
            job = await self.admit(key)
        finally:
            self.waiting -= 1
        return await self.respond(req, session_id, job, work, chat)

    async def respond(self, req: api.Sampling, session_id: str | None, job: _Job, work, chat: bool):
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
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.pool.shutdown, True)
        await loop.run_in_executor(None, self.io.shutdown, True)  # pending check-ins finish first
        await loop.run_in_executor(None, self.store.close)
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

    def auth(request: Request) -> Tenant:
        try:
            return server.keys.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            raise api.ApiError(401, str(exc), code="invalid_api_key") from None

    @app.exception_handler(api.ApiError)
    async def api_error(request, exc: api.ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(api.ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(api.ApiError(400, str(exc.errors()[:1])[:300]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        error = api.ApiError(500, "internal error; see the server log", "server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        """Liveness, public: nothing about load or sessions (that is /v1/status, behind the key)."""
        return {"status": "shutting_down" if server.closing else "ok"}

    @app.get("/v1/status")
    async def status(tenant: Tenant = Depends(auth)):
        sessions = await server.off_loop(server.store.ids, tenant.namespace)
        return {"object": "status", "status": "shutting_down" if server.closing else "ok",
                "model": settings.model_name, "sessions": len(sessions), "active": len(server.jobs),
                "waiting": server.waiting, "max_concurrency": settings.max_concurrency,
                "max_queue": settings.max_queue}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "hiermem"}]}

    @app.post("/v1/completions")
    async def completions(request: Request, tenant: Tenant = Depends(auth)):
        return await server.handle(request, tenant, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, tenant: Tenant = Depends(auth)):
        return await server.handle(request, tenant, chat=True)

    @app.get("/v1/sessions")
    async def session_list(tenant: Tenant = Depends(auth)):
        ids = await server.off_loop(server.store.ids, tenant.namespace)
        return {"object": "list", "data": [{"id": sid, "object": "session"} for sid in ids]}

    def not_found(session_id: str) -> api.ApiError:  # the same answer whoever owns the id
        return api.ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")

    @app.get("/v1/sessions/{session_id}")
    async def session_stats(session_id: str, tenant: Tenant = Depends(auth)):
        key = server.session_key(tenant, session_id)
        stats = await server.off_loop(lambda: (s := server.store.get(key)) and s.stats())
        if not stats:
            raise not_found(session_id)
        return {"id": session_id, "object": "session", "memory": stats}

    @app.delete("/v1/sessions/{session_id}")
    async def session_delete(session_id: str, tenant: Tenant = Depends(auth)):
        key = server.session_key(tenant, session_id)
        try:
            found = await server.off_loop(server.store.delete, key)
        except SessionBusyError:
            raise api.ApiError(409, f"session {session_id!r} is in use; retry when its request is done",
                               param="session_id", code="session_busy") from None
        if not found:
            raise not_found(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    return app


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
          api_keys_file: str | None = None, insecure: bool = False, model_name: str | None = None,
          max_sessions: int = 64, session_ttl: float = 3600.0, session_memory_mb: int = 1024,
          session_dir: str | None = None, history_turns: int = 64, history_kb: int = 256, max_concurrency: int = 2,
          max_queue: int = 16, queue_timeout: float = 30.0, max_body_kb: int = 4096, max_messages: int = 1024,
          max_prompt_tokens: int = 32768, max_tokens_limit: int = 2048, max_stops: int = 4,
          max_stop_chars: int = 256, max_beams: int = 4, shutdown_grace: float = 10.0, threads: int | None = None,
          device: str | None = None, dtype: str | None = None) -> int:
    """Serve a memory model over an OpenAI-compatible HTTP API with per-session memory.

    POST /v1/completions and /v1/chat/completions (streaming with "stream": true), GET /v1/models,
    GET/DELETE /v1/sessions[/ID], GET /v1/status, and the public liveness probe GET /health. Pass
    "session_id" in the body (or the X-Session-Id header) to keep a memory between requests;
    sessions belong to the API key that made them. Binds 127.0.0.1; any other address needs an
    API key (--api-key, HIERMEM_API_KEY or --api-keys-file) or --insecure. Requests beyond a limit
    get an OpenAI-style 4xx. SIGINT/SIGTERM stop it gracefully.

    Args:
        model: checkpoint folder, quantized folder or released weights name (default: bundled default)
        host: address to bind (0.0.0.0 exposes the server to the network: needs a key or --insecure)
        port: TCP port
        api_key: required bearer token (default: $HIERMEM_API_KEY; none: no auth)
        api_keys_file: file of accepted keys, one per line as KEY or NAME KEY; each key has its own sessions
        insecure: allow a non-loopback address without any API key
        model_name: model id clients pass (default: the folder name, or "hiermem"; "hiermem" always works)
        max_sessions: memory sessions kept at once (least recently used ones are evicted)
        session_ttl: seconds an idle session is kept
        session_memory_mb: memory all sessions' states and chat histories may hold together
        session_dir: folder to persist sessions to (evicted ones, and all at shutdown; one subfolder per key)
        history_turns: chat turns a session keeps as text (older ones live on only in its memory)
        history_kb: chat text a session keeps, in KiB
        max_concurrency: requests generating at once (worker threads)
        max_queue: requests waiting beyond those (more get HTTP 429)
        queue_timeout: seconds a request may wait for a worker (then HTTP 503)
        max_body_kb: largest request body in KiB (HTTP 413 beyond)
        max_messages: most chat messages in one request
        max_prompt_tokens: longest prompt in tokens
        max_tokens_limit: largest max_tokens a request may ask for
        max_stops: most stop strings in one request
        max_stop_chars: longest stop string in characters
        max_beams: largest num_beams a request may ask for
        shutdown_grace: seconds in-flight requests get to finish at shutdown before they are cancelled
        threads: torch CPU threads (default: CPU cores / max_concurrency, so workers do not oversubscribe)
        device: cpu, cuda or auto
        dtype: float32, bfloat16, float16 or auto
    """
    from hiermem.inference.cli import check_port
    from hiermem.inference.runtime import load_for_inference
    from hiermem.models import model_folder

    api_key = api_key or os.environ.get("HIERMEM_API_KEY") or None
    keys = KeyRing.load(api_key, api_keys_file)  # a bad keys file fails here, before the model loads
    if not is_loopback(host) and not keys.enabled:
        if not insecure:
            raise ConfigError(f"refusing to serve on {host} without an API key: anyone who can reach it could use "
                              "it. Set --api-key, HIERMEM_API_KEY or --api-keys-file (or pass --insecure)")
        log.warning("serving on %s without an API key (--insecure): anyone who can reach it can use it", host)
    check_port(host, port)  # a busy port fails now, not once the model has loaded
    folder = model_folder(model)
    settings = ServerSettings(model_name=model_name or (folder.name if folder else MODEL_ALIAS), api_key=api_key,
                              api_keys_file=api_keys_file, max_sessions=max_sessions, session_ttl_s=session_ttl,
                              session_memory_bytes=session_memory_mb << 20, session_dir=session_dir,
                              history_turns=history_turns, history_bytes=history_kb << 10,
                              max_concurrency=max_concurrency, max_queue=max_queue, queue_timeout_s=queue_timeout,
                              max_body_bytes=max_body_kb << 10, max_messages=max_messages,
                              max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                              max_stops=max_stops, max_stop_chars=max_stop_chars, max_beams=max_beams)
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max_concurrency))
    hmt, tokenizer = load_for_inference(model, device=device, dtype=dtype)
    app = create_app(hmt, tokenizer, settings)
    log.info("serving %r on http://%s:%d (%d API key(s))", settings.model_name, host, port, len(keys.tenants))
    _Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_grace,
                           log_level="info")).run()
    return 0
