"""The Ollama API of `ember serve`, through the official `ollama` client against a real server process."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.server_helpers import shared_server

ollama = pytest.importorskip("ollama")

GREEDY = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def test_generate(client, server):
    reply = client.generate(model=server.model, prompt="Once upon a time", options=GREEDY, stream=False)
    assert reply.done and reply.done_reason in ("stop", "length") and reply.response
    assert reply.eval_count <= 8 and reply.prompt_eval_count > 0
    assert reply.total_duration >= reply.eval_duration > 0
    assert reply.context and isinstance(reply.context[0], int)
    pieces = list(client.generate(model=f"{server.model}:latest", prompt="Once upon a time", options=GREEDY,
                                  stream=True))
    assert pieces[-1].done and not any(p.done for p in pieces[:-1])
    assert "".join(p.response for p in pieces) == reply.response
    assert pieces[-1].eval_count == reply.eval_count


def test_generate_raw_and_system(client, server):
    raw = client.generate(model=server.model, prompt="Hello", raw=True, options=GREEDY, stream=False)
    system = client.generate(model=server.model, prompt="Hello", system="Be kind.", options=GREEDY, stream=False)
    assert raw.prompt_eval_count < system.prompt_eval_count


def test_chat(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    reply = client.chat(model=server.model, messages=messages, options=GREEDY, stream=False)
    assert reply.message.role == "assistant" and reply.message.content and reply.done
    pieces = list(client.chat(model=server.model, messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in pieces) == reply.message.content
    assert pieces[-1].done and pieces[-1].done_reason == reply.done_reason


def test_options_stop_and_seed(client, server):
    options = {"temperature": 1.0, "seed": 7, "num_predict": 12, "num_ctx": 2048, "stop": ["\n"]}
    first = client.generate(model=server.model, prompt="Once", options=options, keep_alive="5m", stream=False)
    second = client.generate(model=server.model, prompt="Once", options=options, keep_alive=0, stream=False)
    assert first.response == second.response and "\n" not in first.response


def test_models(client, server):
    tags = client.list().models
    assert [m.model for m in tags] == [f"{server.model}:latest", "ember-default:latest"]
    assert tags[0].size > 0 and tags[0].details.family == "llama"
    shown = client.show(server.model)
    assert "<|assistant|>" in shown.template and "completion" in shown.capabilities
    running = client.ps().models
    assert running[0].model == f"{server.model}:latest"


def test_embed(client, server):
    result = client.embed(model=server.model, input=["hello world", "goodbye"])
    assert len(result.embeddings) == 2
    assert all(math.isclose(sum(v * v for v in e), 1.0, rel_tol=1e-4) for e in result.embeddings)
    legacy = client.embeddings(model=server.model, prompt="hello world")
    norm = math.sqrt(sum(v * v for v in legacy.embedding))
    assert all(math.isclose(a, b / norm, abs_tol=1e-4) for a, b in zip(result.embeddings[0], legacy.embedding, strict=True))


def test_version_and_root(server):
    assert httpx.get(f"{server.url}/api/version").json()["version"]
    assert "running" in httpx.get(server.url).text


def test_errors_are_ollama_shaped(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="missing-model", prompt="hi")
    assert err.value.status_code == 404 and "missing-model" in err.value.error
    r = httpx.post(f"{server.url}/api/generate", json={"prompt": "hi", "format": "json", "stream": False})
    assert r.status_code == 400 and set(r.json()) == {"error"} and "not supported" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "options": {"temperature": "hot"}, "stream": False})
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/generate", content="{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    assert client.generate(model=server.model, prompt="hi", options=GREEDY).done
