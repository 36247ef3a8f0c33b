"""Every client error answers 4xx/503 with the API's error shape, and the next good request still works."""

from __future__ import annotations

import httpx
import pytest

from tests.server_helpers import shared_server


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
