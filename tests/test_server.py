"""`hiermem serve`: a real uvicorn server on loopback, driven by the official openai client and raw httpx."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from tiny import tiny_hmt, tiny_model_folder, tiny_tokenizer

from hiermem.cli import main
from hiermem.inference.server import create_app, is_loopback, running
from hiermem.inference.sessions import Session
from hiermem.inference.tenants import namespace_of

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """As `hiermem serve` does: CPU threads / workers, so concurrent requests do not oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def url():
    app = create_app(tiny_hmt("llama"), tiny_tokenizer(), model_name="tiny", api_key=KEY, max_tokens_limit=4096,
                     max_body_bytes=20_000, max_prompt_tokens=2000, max_json_values=2000, max_messages=8,
                     body_timeout_s=0.5)
    with running(app) as base:
        yield base


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def test_completions_stream_equals_plain(client):
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0)
    parts = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == plain.choices[0].text
    assert plain.choices[0].finish_reason == parts[-1].choices[0].finish_reason == "length"
    assert plain.usage.prompt_tokens == len("Once upon a time") and plain.usage.completion_tokens == 40
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_stream_equals_plain(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and plain.choices[0].message.role == "assistant"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens > 30


def test_session_memory_carries_between_requests(client, url):
    first = client.completions.create(model="tiny", prompt="The first chapter begins here. " * 3, max_tokens=10,
                                      temperature=0, extra_body={"session_id": "doc-1"})
    mem1 = first.model_extra["hiermem"]["memory"]
    assert mem1["tokens"] == first.usage.total_tokens and mem1["segments"] >= 5
    second = client.completions.create(model="tiny", prompt="And then", max_tokens=10, temperature=0,
                                       extra_body={"session_id": "doc-1"})
    mem2 = second.model_extra["hiermem"]["memory"]
    assert mem2["tokens"] == mem1["tokens"] + second.usage.total_tokens
    assert mem2["slots_used"] >= mem1["slots_used"] > 0
    fresh = client.completions.create(model="tiny", prompt="And then", max_tokens=10, temperature=0)
    assert fresh.model_extra["hiermem"]["memory"]["tokens"] == second.usage.total_tokens
    assert fresh.choices[0].text != second.choices[0].text  # memory changed what the model says
    with httpx.Client(base_url=url, headers=AUTH) as h:
        assert h.get("/v1/sessions/doc-1").json()["memory"]["tokens"] == mem2["tokens"]
        assert h.delete("/v1/sessions/doc-1").json()["deleted"] is True
        assert h.get("/v1/sessions/doc-1").status_code == 404


def test_chat_session_by_header_reads_only_new_messages(client):
    h = {"X-Session-Id": "chat-1"}
    one = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                         temperature=0, extra_headers=h)
    two = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "more"}], max_tokens=8,
                                         temperature=0, extra_headers=h)
    mem = two.model_extra["hiermem"]["memory"]
    assert mem["turns"] == 2 and mem["tokens"] == one.usage.total_tokens + two.usage.total_tokens


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "tiny", "prompt": 7}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "n": 3}', 400, "n"),
    (b'{"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"model": "tiny", "prompt": "x", "stop": "' + b"s" * 257 + b'"}', 400, "stop"),
    (b'{"model": "tiny", "prompt": "x", "num_beams": 5}', 400, "num_beams"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "seed": 100000000000000000000000}', 400, "seed"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (b'{"model": "tiny", "prompt": "x", "stop": [' + b'"a",' * 3000 + b'"a"]}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "session_id": "../../etc"}', 400, "session_id"),
    (b'{"model": "tiny", "prompt": "x", "session_id": "abc\\n"}', 400, "session_id"),
    (b'{"model": "tiny", "prompt": ""}', 400, "prompt"),
    (b'{"model": "other", "prompt": "x"}', 404, "model"),
    (b'{"model": "' + b"m" * 9000 + b'", "prompt": "x"}', 404, "model"),
    (b'{"prompt": "x"}', 400, "model"),
])
def test_bad_requests_get_openai_style_errors(url, body, status, param):
    r = httpx.post(url + "/v1/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_limits_auth_and_routes(url):
    big = {"model": "tiny", "prompt": "x" * 30_000}
    assert httpx.post(url + "/v1/completions", json=big, headers=AUTH).status_code == 413
    long = {"model": "tiny", "prompt": "x" * 2500}
    r = httpx.post(url + "/v1/completions", json=long, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    chat = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=AUTH).status_code == 400
    assert httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": []},
                      headers=AUTH).status_code == 400
    no_auth = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert no_auth.status_code == 401 and no_auth.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/health").json()["status"] == "ok"
    missing = httpx.get(url + "/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and "error" in missing.json()


def test_client_disconnect_cancels_generation(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "go", "max_tokens": 4000,
                                                        "min_tokens": 4000, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 10
        while h.get("/v1/status").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.get("/v1/status").json()["active"] == 0


def _burst(url, n, max_tokens, session_ids=None):
    async def one(c, i):
        body = {"model": "tiny", "prompt": "load", "max_tokens": max_tokens, "min_tokens": max_tokens}
        if session_ids:
            body["session_id"] = session_ids[i]
        r = await c.post("/v1/completions", json=body)
        return r.status_code, r.json()

    async def all_():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    return asyncio.run(all_())


def test_overload_answers_429_and_503_never_5xx_crash():
    model, tok = tiny_hmt("llama"), tiny_tokenizer()
    app = create_app(model, tok, model_name="tiny", max_concurrency=1, max_queue=1, max_tokens_limit=4000)
    with running(app) as url:
        results = _burst(url, 6, 600)
        codes = sorted(c for c, _ in results)
        assert codes.count(200) == 2 and codes.count(429) == 4, codes  # one running + one queued
        assert all(b["error"]["code"] == "rate_limit_exceeded" for c, b in results if c == 429)
        assert httpx.get(url + "/health").json() == {"status": "ok"}  # public: no load figures
        status = httpx.get(url + "/v1/status").json()
        assert (status["sessions"], status["active"], status["waiting"]) == (0, 0, 0)
    app = create_app(model, tok, model_name="tiny", max_concurrency=1, max_queue=4, queue_timeout_s=0.3,
                     max_tokens_limit=4000)
    with running(app) as url:
        codes = sorted(c for c, _ in _burst(url, 2, 600))
        assert codes == [200, 503]


def test_same_session_requests_are_serialised(url):
    results = _burst(url, 3, 30, session_ids=["same"] * 3)
    assert [c for c, _ in results] == [200] * 3
    total = sum(b["usage"]["total_tokens"] for _, b in results)
    assert max(b["hiermem"]["memory"]["tokens"] for _, b in results) == total  # nothing lost or interleaved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_persists_sessions_and_shuts_down_gracefully(tmp_path):
    folder = tiny_model_folder(tmp_path)
    port, sessions = _free_port(), tmp_path / "sessions"
    proc = subprocess.Popen([sys.executable, "-m", "hiermem.cli", "serve", "--model", str(folder), "--port", str(port),
                             "--session-dir", str(sessions), "--shutdown-grace", "1", "--max-tokens-limit", "100000"],
                            env={**os.environ, "HIERMEM_API_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        assert httpx.get(base + "/v1/models").status_code == 401  # the key came from the environment
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        done = client.completions.create(model="model", prompt="remember this", max_tokens=5,
                                         extra_body={"session_id": "kept"})
        tokens = done.model_extra["hiermem"]["memory"]["tokens"]
        streamed = []

        def long_stream():
            try:
                for part in client.completions.create(model="model", prompt="go", max_tokens=90000, stream=True,
                                                      extra_body={"session_id": "cut", "min_tokens": 90000}):
                    streamed.append(part)
            except (openai.APIError, httpx.HTTPError):
                pass

        reader = threading.Thread(target=long_stream)
        reader.start()
        deadline = time.monotonic() + 60
        while len(streamed) < 3:
            assert reader.is_alive() and time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once it is done
    assert "server stopped cleanly" in out and "Traceback" not in out, out
    model = __import__("hiermem.inference.runtime", fromlist=["x"]).load_for_inference(str(folder))[0]
    own = sessions / namespace_of(KEY)  # one folder per key, named by its hash
    assert Session.load(own / "kept.safetensors", model).stats()["tokens"] == tokens
    cut = Session.load(own / "cut.safetensors", model).stats()["tokens"]
    assert len(streamed) - 1 <= cut < 90000  # the in-flight stream was cancelled, its memory kept


def test_readme_openai_snippet_works_with_the_package_name_as_model(url):
    """README's example, verbatim but for the URL and key: model="hiermem" names the served model."""
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="hiermem", messages=[{"role": "user", "content": "Hi"}],
                                           extra_body={"session_id": "alice"}, max_tokens=4)
    assert reply.model == "tiny" and reply.model_extra["hiermem"]["session_id"] == "alice"
    assert client.completions.create(model="hiermem", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_limits_on_messages_json_values_and_slow_bodies(url):
    many = {"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 9}
    r = httpx.post(url + "/v1/chat/completions", json=many, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        start, answer = time.monotonic(), b""
        while b"request_timeout" not in answer and (chunk := sock.recv(4096)):  # headers and body may come apart
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer and time.monotonic() - start < 5


def test_health_is_public_and_everything_else_needs_the_key(url):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    for method, path in [("GET", "/v1/status"), ("GET", "/v1/sessions"), ("GET", "/v1/sessions/x"),
                         ("DELETE", "/v1/sessions/x"), ("GET", "/v1/models")]:
        r = httpx.request(method, url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path


def _keys_file(tmp_path):
    keys = {"alice": "sk-alice-0123456789abcdef", "bob": "sk-bob-fedcba9876543210"}
    path = tmp_path / "keys.txt"
    path.write_text("# tenants\n" + "".join(f"{n}  {k}\n" for n, k in keys.items()) + "\n")
    path.chmod(0o600)
    return path, keys


def test_each_key_sees_only_its_own_sessions(tmp_path):
    path, keys = _keys_file(tmp_path)
    folder = tmp_path / "sessions"
    app = create_app(tiny_hmt("llama"), tiny_tokenizer(), model_name="tiny", api_keys_file=str(path),
                     session_dir=str(folder), max_sessions=1)  # one held session: the rest go to disk
    with running(app) as base:
        alice, bob = ({"Authorization": f"Bearer {keys[n]}"} for n in ("alice", "bob"))
        body = {"model": "tiny", "prompt": "alice's secret plans", "max_tokens": 3, "session_id": "s1"}
        first = httpx.post(base + "/v1/completions", json=body, headers=alice).json()
        tokens = first["hiermem"]["memory"]["tokens"]
        httpx.post(base + "/v1/completions", json={**body, "session_id": "other"}, headers=alice)  # s1 to disk
        with httpx.Client(base_url=base, headers=bob) as h:
            assert h.get("/v1/sessions").json()["data"] == []
            unknown = h.get("/v1/sessions/never-made")
            guessed = h.get("/v1/sessions/s1")
            assert guessed.status_code == unknown.status_code == 404
            assert guessed.json()["error"] == {**unknown.json()["error"], "message": "no session 's1'"}
            assert h.delete("/v1/sessions/s1").status_code == 404
            continued = h.post("/v1/completions", json={**body, "prompt": "hi"}).json()  # bob's own, fresh s1
            assert continued["hiermem"]["memory"]["tokens"] == continued["usage"]["total_tokens"]
            assert h.get("/v1/status").json()["sessions"] == 1
        with httpx.Client(base_url=base, headers=alice) as h:
            assert [d["id"] for d in h.get("/v1/sessions").json()["data"]] == ["other", "s1"]
            assert h.get("/v1/sessions/s1").json()["memory"]["tokens"] == tokens  # untouched by bob
            assert h.delete("/v1/sessions/s1").json()["deleted"] is True
        with httpx.Client(base_url=base, headers=bob) as h:
            assert h.get("/v1/sessions/s1").status_code == 200  # bob's s1 survives alice's delete
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sk-carol-0123456789"}).status_code == 401
    stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert stored == [f"{namespace_of(keys['alice'])}/other.safetensors", f"{namespace_of(keys['bob'])}/s1.safetensors"]
    for p in folder.rglob("*"):  # no key in any path or file
        assert not any(k in p.as_posix() for k in keys.values())
        assert p.is_dir() or not any(k.encode() in p.read_bytes() for k in keys.values())


def test_keys_file_errors_and_exposed_bind_without_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HIERMEM_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "never-loaded")]) == 2
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    for text, message in [("a b c\n", "expected 'KEY' or 'NAME KEY'"), ("short\n", "8-256 printable"),
                          ("x sk-0123456789\nx sk-9876543210\n", "used twice"), ("# nothing\n", "holds no API keys")]:
        bad.write_text(text)
        assert main(["serve", "--api-keys-file", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and "sk-0123456789" not in err


def test_chat_history_is_capped_and_counted_in_the_byte_budget(tmp_path):
    app = create_app(tiny_hmt("llama"), tiny_tokenizer(), model_name="tiny", history_turns=2,
                     history_bytes=4096, session_dir=str(tmp_path))
    with running(app) as base, httpx.Client(base_url=base) as h:
        messages = []
        for turn in range(5):
            messages.append({"role": "user", "content": f"turn {turn} " + "x" * 100})
            r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 5,
                                                      "session_id": "long"}).json()
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            memory = r["hiermem"]["memory"]
            assert r["usage"]["prompt_tokens"] < 160  # the whole conversation is resent; only the turn is read
        assert memory["turns"] == 5 and memory["history_turns"] == 2
        assert 2 * 100 < memory["history_bytes"] < 2 * 100 + 200
        stats = h.get("/v1/sessions/long").json()["memory"]
        assert stats["state_bytes"] >= memory["history_bytes"] + 1  # the text counts towards the budget
    restored = Session.load(tmp_path / "public" / "long.safetensors", tiny_hmt("llama"))
    assert [m["content"][:6] for m in restored.history] == ["turn 3", messages[7]["content"][:6], "turn 4",
                                                             messages[9]["content"][:6]]
