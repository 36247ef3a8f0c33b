"""Function tools on the Responses API (/v1/responses) through a real `ember serve`, with the official openai
client: the tiny random model given Qwen QwQ's template (Hermes calls) makes the call tool_choice requires,
streamed as the SDK's function-call events; the call and its result go back (as input items, or through
previous_response_id) and the model answers."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.test_tool_serving import CITIES, TOOLS, start_templated

openai = pytest.importorskip("openai")

FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the Responses API's flat shape
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
NAMED = {"type": "function", "name": "get_weather"}
SEED = {"seed": 7}  # ember's extension: the SDK's responses.create has no seed argument


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_templated(tmp_path_factory, "qwen")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)


def _ask(client, server, **kwargs):
    settings = {"tools": FLAT_TOOLS, "max_output_tokens": 80, "temperature": 1.0, "extra_body": SEED, **kwargs}
    return client.responses.create(model=server.model, **settings)


def _calls(response):
    return [item for item in response.output if item.type == "function_call"]


def _check_call(call, name="get_weather"):
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed" and call.name == name
    arguments = json.loads(call.arguments)
    if name == "get_weather":
        assert list(arguments) == ["city"] and arguments["city"] in CITIES


def test_required_and_named_calls(client, server):
    required = _ask(client, server, input=QUESTION, tool_choice="required", parallel_tool_calls=False)
    assert required.status == "completed" and len(_calls(required)) == 1
    _check_call(_calls(required)[0], _calls(required)[0].name)
    assert required.tool_choice == "required" and required.parallel_tool_calls is False
    assert [t.name for t in required.tools] == ["get_weather", "get_time"]
    named = _ask(client, server, input=QUESTION, tool_choice=NAMED, parallel_tool_calls=False)
    assert named.status == "completed" and [item.type for item in named.output] == ["function_call"]
    _check_call(named.output[0])


def test_round_trip_as_input_and_through_previous_response(client, server):
    first = _ask(client, server, input=QUESTION, tool_choice=NAMED, parallel_tool_calls=False)
    (call,) = _calls(first)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    explicit = _ask(client, server, input=[*QUESTION, call.model_dump(exclude_none=True), result],
                    tool_choice="none", temperature=0)
    assert explicit.output[-1].type == "message" and not _calls(explicit)
    assert isinstance(explicit.output_text, str)
    shorter = _ask(client, server, input=QUESTION, tool_choice="none", max_output_tokens=1)
    assert explicit.usage.input_tokens > shorter.usage.input_tokens  # the call and its result reached the prompt
    chained = _ask(client, server, input=[result], previous_response_id=first.id, tool_choice="none", temperature=0)
    # the stored conversation kept the call: the same prompt, so the same greedy answer
    assert chained.usage.input_tokens == explicit.usage.input_tokens
    assert chained.output_text == explicit.output_text


def test_stream_function_call_events(client, server):
    whole = _ask(client, server, input=QUESTION, tool_choice=NAMED, parallel_tool_calls=False)
    with client.responses.stream(model=server.model, input=QUESTION, tools=FLAT_TOOLS, tool_choice=NAMED,
                                 parallel_tool_calls=False, max_output_tokens=80, temperature=1.0, extra_body=SEED) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[2].item
    assert added.type == "function_call" and added.arguments == "" and added.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (call,) = _calls(final)
    assert deltas == call.arguments == events[-3].arguments and call.id == added.id
    _check_call(call)
    assert json.loads(call.arguments) == json.loads(_calls(whole)[0].arguments)  # seeded: the same call


def test_refused_tools_and_inputs(server):
    url = f"{server.url}/v1/responses"
    bad = [({"tools": [{"type": "web_search"}]}, "tools"),
           ({"tools": [{"type": "function", "name": "bad name"}]}, "tools"),
           ({"tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
           ({"tool_choice": "required"}, "tool_choice"),
           ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
           ({"input": [{"type": "file_search_call", "id": "x"}]}, "input")]
    for extra, param in bad:
        body = {"model": server.model, "input": "Hi", "max_output_tokens": 2, **extra}
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
