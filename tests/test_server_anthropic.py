"""Anthropic's Messages API of `ember serve`, through the official `anthropic` client against a real server."""

from __future__ import annotations

import httpx
import pytest

from tests.server_helpers import InProcessServer, shared_server

anthropic = pytest.importorskip("anthropic")

SYSTEM = "You are terse."
TURNS = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"},
         {"role": "user", "content": [{"type": "text", "text": "Go "}, {"type": "text", "text": "on."}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def openai_text(server, messages: list[dict], max_tokens: int, **extra) -> dict:
    """The same conversation through /v1/chat/completions: the oracle for what greedy decoding yields."""
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                               "temperature": 0, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def as_openai(system: str | None, turns: list[dict]) -> list[dict]:
    def text(content):
        return content if isinstance(content, str) else "".join(b["text"] for b in content)

    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": t["role"], "content": text(t["content"])} for t in turns]


def test_create_multi_turn_with_system(client, server):
    reply = client.messages.create(model=server.model, system=SYSTEM, messages=TURNS, max_tokens=12,
                                   extra_body={"temperature": 0})
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == server.model
    expected = openai_text(server, as_openai(SYSTEM, TURNS), 12)
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == expected["choices"][0]["message"]["content"]
    assert reply.usage.input_tokens == expected["usage"]["prompt_tokens"]
    assert reply.usage.output_tokens == expected["usage"]["completion_tokens"]
    assert reply.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[expected["choices"][0]["finish_reason"]]
    assert reply.stop_sequence is None


def test_consecutive_turns_are_combined(client, server):
    split = [{"role": "user", "content": "Tell me"}, {"role": "user", "content": "a story."}]
    combined = client.messages.count_tokens(model=server.model, messages=[
        {"role": "user", "content": "Tell me\n\na story."}]).input_tokens
    assert client.messages.count_tokens(model=server.model, messages=split).input_tokens == combined


def test_max_tokens_stop_reason(client, server):
    reply = client.messages.create(model=server.model, messages=TURNS[:1], max_tokens=3, extra_body={"temperature": 0},
                                   metadata={"user_id": "u-1"})
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 3
    warmed = client.messages.create(model=server.model, messages=TURNS[:1], max_tokens=0)  # the prompt only
    assert warmed.stop_reason == "max_tokens" and warmed.usage.output_tokens == 0 and warmed.content[0].text == ""


def test_stop_sequence(client, server):
    whole = client.messages.create(model=server.model, messages=TURNS[:1], max_tokens=16, extra_body={"temperature": 0})
    text = whole.content[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), text
    reply = client.messages.create(model=server.model, messages=TURNS[:1], max_tokens=16, extra_body={"temperature": 0},
                                   stop_sequences=["never-in-here", stop])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    assert reply.content[0].text == text[: text.index(stop)]


def test_stream_events_and_text(client, server):
    kwargs = dict(model=server.model, system=[{"type": "text", "text": SYSTEM}], messages=TURNS, max_tokens=10,
                  extra_body={"temperature": 0})
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_stop" in kinds and kinds.count("content_block_start") == 1
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "".join(deltas) == whole.content[0].text == final.content[0].text
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_raw_stream_has_ping_and_event_names(server):
    body = {"model": server.model, "messages": TURNS[:1], "max_tokens": 4, "stream": True, "stop_sequences": ["\n"]}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("event: ")]
    names = [line[7:] for line in lines]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_assistant_prefill_continues(client, server):
    prefix = client.messages.create(model=server.model, messages=TURNS[:1], max_tokens=8, extra_body={"temperature": 0})
    head = prefix.content[0].text[:5]
    reply = client.messages.create(model=server.model, max_tokens=3, extra_body={"temperature": 0},
                                   messages=[*TURNS[:1], {"role": "assistant", "content": head}])
    assert (head + reply.content[0].text).startswith(prefix.content[0].text[: len(head) + 1])


def test_count_tokens_equals_prompt_length(client, server):
    counted = client.messages.count_tokens(model=server.model, system=SYSTEM, messages=TURNS).input_tokens
    rendered = httpx.post(f"{server.url}/apply-template", json={"messages": as_openai(SYSTEM, TURNS)}).json()
    tokens = httpx.post(f"{server.url}/tokenize", json={"content": rendered["prompt"]}).json()["tokens"]
    assert counted == len(tokens)
    assert counted == client.messages.create(model=server.model, system=SYSTEM, messages=TURNS, max_tokens=1,
                                             extra_body={"temperature": 0}).usage.input_tokens


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "output_config"),
])
def test_refused_fields_name_themselves(client, server, extra, param):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=server.model, messages=TURNS[:1], max_tokens=4, **extra)
    assert caught.value.status_code == 400 and param in caught.value.message
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"


def test_errors_are_anthropic_exceptions(client, server):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(model=server.model, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=4, messages=TURNS[:1])
    r = httpx.post(f"{server.url}/v1/messages", json={"messages": TURNS[:1]})  # max_tokens is required
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=server.model, max_tokens=4, messages=[{"role": "user", "content": "x" * 40000}])


def test_x_api_key(server):
    with InProcessServer(server.model_dir, api_key="sesame") as served:
        good = anthropic.Anthropic(base_url=served.url, api_key="sesame", max_retries=0, timeout=60)
        assert good.messages.create(model=server.model, messages=TURNS[:1], max_tokens=2).usage.output_tokens == 2
        bad = anthropic.Anthropic(base_url=served.url, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            bad.messages.create(model=server.model, messages=TURNS[:1], max_tokens=2)
        assert caught.value.body["error"]["type"] == "authentication_error"
