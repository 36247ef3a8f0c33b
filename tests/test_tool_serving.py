"""Tool calls and reasoning through a real `ember serve`, with the official openai and ollama clients: the tiny
random model given real chat templates (Qwen QwQ: Hermes calls and <think>, Llama 3.1, Mistral Nemo) makes the calls
tool_choice requires (enforced by the grammar), takes the tool's result back and answers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import SHARED
from tests.server_helpers import make_tiny_chat_model, start_server

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

# QwQ's template opens <think> in the generation prompt when enable_thinking is set and closes it otherwise.
TEMPLATES = {"qwen": "Qwen-QwQ-32B.jinja", "llama3": "meta-llama-Llama-3.1-8B-Instruct.jinja",
             "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja"}
CITIES = ["Paris", "Tokyo", "Lima"]
TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "The weather in a city.",
             "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
                            "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                           "parameters": {"type": "object", "properties": {}}}}]
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
THINKING = {"chat_template_kwargs": {"enable_thinking": True}}


def start_templated(tmp_path_factory, family):
    """`ember serve` on the tiny random model given `family`'s real chat template."""
    directory = make_tiny_chat_model(tmp_path_factory.mktemp(family) / f"tiny-{family}", SHARED)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = (SHARED / "templates" / TEMPLATES[family]).read_text()
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return start_server(directory, timeout=240)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    def start(family):
        return start_templated(tmp_path_factory, family)

    with ThreadPoolExecutor(len(TEMPLATES)) as pool:  # start-up is mostly imports: overlap them
        started = dict(zip(TEMPLATES, pool.map(start, TEMPLATES), strict=True))
    yield started
    for server in started.values():
        server.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)


def _check_call(call, name="get_weather"):
    assert call.type == "function" and call.id and call.function.name == name
    arguments = json.loads(call.function.arguments)
    assert arguments == ({} if name == "get_time" else {"city": arguments["city"]})
    if name == "get_weather":
        assert arguments["city"] in CITIES
    return arguments


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral"])
def test_required_call_round_trip(servers, family):
    server = servers[family]
    client = _client(server)
    kwargs = dict(model=server.model, tools=TOOLS, max_tokens=80, temperature=1.0, seed=7)
    reply = client.chat.completions.create(messages=QUESTION, tool_choice="required", parallel_tool_calls=False,
                                           n=2, **kwargs)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert all(c.function.name in ("get_weather", "get_time") for c in choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(messages=QUESTION, tool_choice=named, parallel_tool_calls=False, **kwargs)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    _check_call(message.tool_calls[0])
    if family == "mistral":  # its template pairs results with calls by 9-character ids
        assert len(message.tool_calls[0].id) == 9

    # streamed: the same call, in deltas; no markup leaks into content
    stream = client.chat.completions.create(messages=QUESTION, tool_choice=named, parallel_tool_calls=False,
                                            stream=True, **kwargs)
    calls, content, finish = {}, "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            if part.id:
                calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
            calls[part.index]["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == json.loads(
        message.tool_calls[0].function.arguments)  # seeded: the same call as the whole reply

    # the result goes back; the model answers
    history = [*QUESTION, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21}'}]
    final = client.chat.completions.create(messages=history, tool_choice="none", **kwargs)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls


def test_required_yields_a_call_every_time(servers):
    server = servers["qwen"]
    client = _client(server)

    def ask(seed):
        reply = client.chat.completions.create(model=server.model, messages=QUESTION, tools=TOOLS,
                                               tool_choice="required", parallel_tool_calls=False, n=10,
                                               max_tokens=80, temperature=1.0, seed=seed)
        return [c.finish_reason == "tool_calls" and len(c.message.tool_calls) >= 1 for c in reply.choices]

    with ThreadPoolExecutor(10) as pool:
        results = [ok for batch in pool.map(ask, range(0, 1000, 100)) for ok in batch]
    assert len(results) == 100 and all(results)


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral"])
def test_ollama_tool_history_and_reply(servers, family):
    server = servers[family]
    client = ollama.Client(host=server.url, timeout=180)
    history = [*QUESTION,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": '{"temperature": 21}', "tool_name": "get_weather"}]
    reply = client.chat(model=server.model, messages=history, tools=TOOLS, options={"num_predict": 8, "seed": 1})
    assert reply.done and isinstance(reply.message.content, str)
    shorter = client.chat(model=server.model, messages=QUESTION, tools=TOOLS, options={"num_predict": 1})
    assert reply.prompt_eval_count > shorter.prompt_eval_count  # the call and its result reached the prompt


def test_ollama_think_switch(servers):
    client = ollama.Client(host=servers["qwen"].url, timeout=180)
    on = client.chat(model=servers["qwen"].model, messages=QUESTION, think=True, options={"num_predict": 1})
    off = client.chat(model=servers["qwen"].model, messages=QUESTION, think=False, options={"num_predict": 1})
    assert off.prompt_eval_count > on.prompt_eval_count  # enable_thinking=false: the template closed <think>
    llama = servers["llama3"]
    r = httpx.post(f"{llama.url}/api/chat", json={"model": llama.model, "messages": QUESTION, "think": True})
    assert r.status_code == 400 and "thinking" in r.json()["error"]


def test_reasoning_split(servers):
    """With thinking on, QwQ's template opens <think> in the prompt: all the random model writes is reasoning."""
    server = servers["qwen"]
    client = _client(server)
    kwargs = dict(model=server.model, messages=QUESTION, max_tokens=12, temperature=0, extra_body=THINKING)
    prompt = httpx.post(f"{server.url}/apply-template", json={"messages": QUESTION, **THINKING}).json()["prompt"]
    ids = httpx.post(f"{server.url}/tokenize", json={"content": prompt}).json()["tokens"]
    raw = client.completions.create(model=server.model, prompt=ids, max_tokens=12, temperature=0).choices[0].text
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content == raw.strip() and not message.content
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                       for c in client.chat.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == raw.strip()
    thinking = ollama.Client(host=server.url, timeout=180).chat(
        model=server.model, messages=QUESTION, think=True, options={"num_predict": 12, "temperature": 0})
    assert thinking.message.thinking == raw.strip() and thinking.message.content == ""


def test_tool_request_errors(servers):
    server = servers["qwen"]
    url = f"{server.url}/v1/chat/completions"
    bad = [({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
           ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
           ({"tool_choice": "required"}, "tool_choice"),
           ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
           ({"tools": [{"type": "web_search"}]}, "tools"),
           ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice")]
    for extra, param in bad:
        r = httpx.post(url, json={"model": server.model, "messages": QUESTION, "max_tokens": 2, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_parsed_call_round_trip(servers, stream):
    """Ollama has no tool_choice; its `format` can hold the answer to Llama 3.1's call shape (a bare JSON object
    with name and parameters), which /api/chat then returns as message.tool_calls; the result goes back and the
    model answers."""
    server = servers["llama3"]
    client = ollama.Client(host=server.url, timeout=180)
    call_shape = {"type": "object", "properties": {
        "name": {"enum": ["get_weather"]},
        "parameters": {"type": "object", "properties": {"city": {"enum": CITIES}}, "required": ["city"],
                       "additionalProperties": False}},
        "required": ["name", "parameters"], "additionalProperties": False}
    options = {"num_predict": 64, "temperature": 1.0, "seed": 3}
    if stream:
        parts = list(client.chat(model=server.model, messages=QUESTION, tools=TOOLS, format=call_shape,
                                 options=options, stream=True))
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert parts[-1].done and "".join(p.message.content or "" for p in parts) == ""
    else:
        reply = client.chat(model=server.model, messages=QUESTION, tools=TOOLS, format=call_shape, options=options)
        calls = reply.message.tool_calls or []
        assert reply.message.content == ""
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments["city"] in CITIES  # arguments as an object, as Ollama returns them
    history = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
               {"role": "tool", "content": '{"temperature": 21}', "tool_name": "get_weather"}]
    final = client.chat(model=server.model, messages=history, tools=TOOLS, options={"num_predict": 8, "seed": 1})
    assert final.done and not final.message.tool_calls
