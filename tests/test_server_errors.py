"""Every client error answers 4xx/503 with the API's error shape, and the next good request still works."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.server_helpers import InProcessServer, shared_model, shared_server, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


def good(url: str, headers: dict | None = None) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body, param", [
    ("{bad json", None),
    ("[1, 2]", None),
    ('"text"', None),
    ('{"prompt": "x", "temperature": "hot"}', "temperature"),
    ('{"prompt": "x", "temperature": 3}', "temperature"),
    ('{"prompt": "x", "n": 99}', "n"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "x", "stop": 5}', "stop"),
    ('{"prompt": "x", "logprobs": 6}', "logprobs"),
    ('{"prompt": "x", "top_k": -5}', "top_k"),
    ('{"prompt": [99999999]}', "prompt"),
    ('{"prompt": []}', "prompt"),
    ('{"prompt": 5}', "prompt"),
    ('{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    ('{"prompt": "x", "seed": -1}', "seed"),
])
def test_bad_completion_bodies(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, param)
    assert error["type"] == "invalid_request_error"
    good(server.url)


def test_unknown_model(server):
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert assert_openai_error(r, 404, "model")["code"] == "model_not_found"
    assert_openai_error(httpx.get(f"{server.url}/v1/models/nope"), 404)
    good(server.url)


def test_prompt_longer_than_context(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": list(range(10, 5000))})
    error = assert_openai_error(r, 400, "prompt")
    assert "more than the context" in error["message"]
    good(server.url)


def test_health(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_host_header_checked_on_loopback(server):
    r = httpx.get(f"{server.url}/v1/models", headers={"Host": "evil.example.com"})
    assert_openai_error(r, 400)
    r = httpx.get(f"{server.url}/api/tags", headers={"Host": "attacker.test:8080"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80", "LOCALHOST"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}).status_code == 200, host
    good(server.url)


def test_body_too_large(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}',
                   headers={"content-type": "application/json"})
    assert_openai_error(r, 413)

    def chunks():  # no Content-Length: the limit holds for chunked uploads too
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"a" * 2**20
        yield b'"}'

    r = httpx.post(f"{server.url}/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    good(server.url)


def test_unsupported_and_unknown_routes(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "response_format": {"type": "json_schema"}})
    assert "needs a json_schema.schema" in assert_openai_error(r, 400, "response_format")["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert_openai_error(r, 400)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert_openai_error(r, 400, "messages")
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "chat_template_kwargs": {"messages": 1}})
    assert_openai_error(r, 400, "chat_template_kwargs")
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "n": 3, "seed": 2**63 - 2})
    assert_openai_error(r, 400, "seed")
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "top_logprobs": 30, "logprobs": True})
    assert_openai_error(r, 400, "top_logprobs")
    good(server.url)


def test_llamacpp_endpoints(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"content": "Hello world", "add_special": True}).json()["tokens"]
    assert ids[0] == 1
    pieces = httpx.post(f"{server.url}/tokenize", json={"content": "Hello", "with_pieces": True}).json()["tokens"]
    assert set(pieces[0]) == {"id", "piece"}
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["content"]
    assert "Hello world" in text
    assert_openai_error(httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_openai_error(httpx.post(f"{server.url}/detokenize", json={"tokens": "abc"}), 400, "tokens")
    prompt = httpx.post(f"{server.url}/apply-template",
                        json={"messages": [{"role": "user", "content": "hi"}]}).json()["prompt"]
    assert prompt.endswith("<|user|>\nhi\n<|assistant|>\n")
    good(server.url)
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("ember_requests_running", "ember_requests_waiting", "ember_prompt_tokens_total",
                 "ember_generation_tokens_total", "ember_time_to_first_token_seconds_bucket",
                 "ember_inter_token_latency_seconds_bucket", "ember_kv_blocks_used", "ember_kv_blocks_total",
                 "ember_prefix_cache_hit_rate"):
        assert name in metrics, name


def engine_idle(url: str, within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        values = {}
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith(("ember_kv_blocks_used{", "ember_requests_running{", "ember_requests_waiting{")):
                values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        if values and all(v == 0 for v in values.values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


LONG = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def test_stream_disconnect_aborts(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    assert engine_idle(server.url), "the aborted stream still holds KV blocks"
    good(server.url)


def test_non_stream_disconnect_aborts(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(10, read=1.0), json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True})
    assert engine_idle(server.url), "the abandoned request still holds KV blocks"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/api/generate", timeout=httpx.Timeout(10, read=1.0), json={
            "prompt": "hi", "stream": False, "options": {"num_predict": 4000, "temperature": 0}})  # greedy: no early EOS
    assert engine_idle(server.url)
    good(server.url)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """In-process: one sequence slot, no queue, an API key and a 64 KiB body limit."""
    with InProcessServer(shared_model(tmp_path_factory), api_key="sesame", max_queue=0, max_body_bytes=2**16,
                         engine_args={"max_num_seqs": 1}) as srv:
        yield srv


def test_api_key_in_process(guarded):
    auth = {"Authorization": "Bearer sesame"}
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # no key needed
    assert_openai_error(httpx.get(f"{guarded.url}/v1/models"), 401)
    assert_openai_error(httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    r = httpx.post(f"{guarded.url}/api/chat", json={"messages": []})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    assert httpx.post(f"{guarded.url}/tokenize", json={"content": "x"}).status_code == 401
    assert httpx.get(f"{guarded.url}/v1/models", headers=auth).status_code == 200
    assert httpx.get(f"{guarded.url}/v1/models", headers={"x-api-key": "sesame"}).status_code == 200
    r = httpx.post(f"{guarded.url}/v1/completions", headers=auth, content=b'{"prompt": "' + b"a" * 2**17 + b'"}')
    assert_openai_error(r, 413)
    good(guarded.url, auth)


def test_queue_full_in_process(guarded):
    auth = {"Authorization": "Bearer sesame"}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", headers=auth, json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()  # kept: dropping the iterator closes the connection, which aborts the stream
        next(lines)
        busy = httpx.post(f"{guarded.url}/v1/completions", headers=auth, json={"prompt": "hi", "max_tokens": 2})
        assert assert_openai_error(busy, 503)["code"] == "queue_full"
        assert busy.headers["Retry-After"]
        busy = httpx.post(f"{guarded.url}/api/generate", headers=auth, json={"prompt": "hi", "stream": False})
        assert busy.status_code == 503 and "Retry-After" in busy.headers
    deadline = time.monotonic() + 2
    while guarded.state.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    good(guarded.url, auth)


def test_sigterm_real_process_with_env_key(tmp_path_factory):
    proc = start_server(shared_model(tmp_path_factory), "--shutdown-grace", "1", api_key="from-env")
    try:
        assert httpx.get(f"{proc.url}/v1/models").status_code == 401
        assert httpx.get(f"{proc.url}/v1/models", headers=proc.headers()).status_code == 200
        with httpx.stream("POST", f"{proc.url}/v1/completions", headers=proc.headers(),
                          json={**LONG, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.process.send_signal(signal.SIGTERM)
            rest = list(lines)
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # aborted: cut short, in OpenAI's words
        assert [line for line in rest if line][-1] == "data: [DONE]"
        assert proc.process.wait(timeout=20) == 0
        assert "ember serving tiny-chat on http://127.0.0.1:" in proc.output()
    finally:
        proc.stop()


def test_loading_state_and_cors_in_process():
    """Before the model is loaded: /health and generation answer 503; CORS preflights pass for listed origins."""
    from ember.server.app import create_app
    from ember.server.state import ServerState, Settings

    app = create_app(ServerState(Settings(cors_origins=["http://ui.test"], api_key="k")))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            r = await client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer k"})
            assert assert_openai_error(r, 503)["code"] == "loading" and r.headers["Retry-After"]
            preflight = await client.options("/v1/chat/completions", headers={
                "Origin": "http://ui.test", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == "http://ui.test"
            denied = await client.get("/v1/models", headers={"Origin": "http://evil.test"})
            assert denied.status_code == 401 and "access-control-allow-origin" not in denied.headers

    asyncio.run(run())
