"""Structured output through every API of a real `ember serve`, with the official openai and ollama clients.

The shared server's model has random weights: whatever it produces is valid only because of the grammar."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server_helpers import shared_server

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

# Ten schemas whose every valid instance is short (bounded strings, arrays, numbers), so max_tokens always fits.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shade": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["color", "shade"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -50, "maximum": 50},
        "y": {"type": "integer", "minimum": -50, "maximum": 50}}, "required": ["x", "y"]}},
     "required": ["point"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                      "active": {"type": "boolean"}},
     "required": ["code", "active"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                      "note": {"type": "string", "maxLength": 6}},
     "required": ["id"]},  # "note" is optional
    {"type": "array", "items": {"enum": [1, 2, 3, "x"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["name", "roles"]}, "ok": {"type": "boolean"}}, "required": ["user", "ok"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "null"}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                                      "score": {"type": "number", "minimum": -1, "maximum": 1},
                                      "level": {"enum": ["low", "high"]}},
     "required": ["date", "score", "level"]},
]


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=130)
    pets: list[Literal["cat", "dog", "fish"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": server.model, **body}, timeout=120)


def test_hundred_samples_of_ten_schemas_all_validate(client, server):
    def sample(index: int):
        schema = SCHEMAS[index]
        reply = client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Sample {index}"}], n=10, temperature=1.0,
            seed=index, max_tokens=160,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}})
        return schema, reply

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(sample, range(len(SCHEMAS))))
    valid = 0
    for schema, reply in results:
        assert len(reply.choices) == 10
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), schema)
            valid += 1
    assert valid == 100
    # Temperature 1 and different seeds: the samples differ, so the grammar (not one lucky text) does the work.
    assert len({c.message.content for _, r in results for c in r.choices}) > 50


@pytest.mark.parametrize("model", ["tiny", "ember-default"])
def test_openai_parse_returns_the_pydantic_object(client, server, model):
    name = server.model if model == "tiny" else model
    try:
        completion = client.chat.completions.parse(
            model=name, messages=[{"role": "user", "content": "Describe a person."}], response_format=Person,
            temperature=1.0, seed=7, max_tokens=120)
    finally:
        if name != server.model:  # unload it: the shared server's other tests expect only their model loaded
            httpx.post(f"{server.url}/api/generate", json={"model": name, "keep_alive": 0}, timeout=60)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert completion.choices[0].finish_reason == "stop"


def test_streaming_and_n_with_json_object(client, server):
    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "JSON please"}], n=2, stream=True,
        temperature=0.0, max_tokens=200, response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": SCHEMAS[3]}})
    texts = ["", ""]
    reasons = [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[3])


def test_vllm_and_llamacpp_fields_produce_matching_text(server):
    cases = [
        ({"guided_regex": "[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch("[a-c]{3}-[0-9]{2}", t)),
        ({"guided_choice": ["north", "south", "east west"]}, lambda t: t in ("north", "south", "east west")),
        ({"structured_outputs": {"regex": "(yes|no)!", "disable_any_whitespace": True, "disable_fallback": True}},
         lambda t: t in ("yes!", "no!")),
        ({"guided_json": SCHEMAS[1]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[1]) is None),
        ({"grammar": 'root ::= "x=" [0-9] [0-9]? ";"'}, lambda t: re.fullmatch(r"x=[0-9][0-9]?;", t)),
        ({"json_schema": SCHEMAS[6]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[6]) is None),
        ({"response_format": {"type": "json_object", "schema": SCHEMAS[2]}},  # llama.cpp's shape
         lambda t: jsonschema.validate(json.loads(t), SCHEMAS[2]) is None),
        ({"guided_grammar": 'root ::= ("ab" | "cd")+', "max_tokens": 400}, lambda t: re.fullmatch("(ab|cd)+", t)),
    ]
    for fields, check in cases:
        body = {"prompt": "Answer:", "temperature": 1.0, "seed": 5, "n": 3, "max_tokens": 64, **fields}
        reply = post(server, "/v1/completions", body)
        assert reply.status_code == 200, reply.text
        for choice in reply.json()["choices"]:
            if "guided_grammar" in fields and choice["finish_reason"] == "length":
                continue  # an unbounded grammar may run to max_tokens; the text so far still matches
            assert choice["finish_reason"] == "stop" and check(choice["text"]), (fields, choice)


def test_llamacpp_completion_route_grammar_and_json_schema(server):
    """llama.cpp's own POST /completion: `grammar` (GBNF) and `json_schema`; bad or both: 400 naming them."""
    grammar = 'root ::= "id-" [0-9] [0-9] [0-9]'
    for fields, check in (({"grammar": grammar}, lambda t: re.fullmatch("id-[0-9]{3}", t)),
                          ({"json_schema": SCHEMAS[4]},
                           lambda t: jsonschema.validate(json.loads(t), SCHEMAS[4]) is None)):
        for stream in (False, True):
            body = {"prompt": "Answer:", "n_predict": 64, "temperature": 1.0, "seed": 9, "stream": stream, **fields}
            reply = post(server, "/completion", body)
            assert reply.status_code == 200, reply.text
            if stream:
                events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: ")]
                text, final = "".join(e["content"] for e in events[:-1]), events[-1]
            else:
                final = reply.json()
                text = final["content"]
            assert final["stop_type"] == "eos" and check(text), (fields, text)
    for fields, param in (({"grammar": "root ::= nope"}, "grammar"),
                          ({"grammar": grammar, "json_schema": SCHEMAS[0]}, "json_schema")):
        reply = post(server, "/completion", {"prompt": "hi", "n_predict": 4, **fields})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_responses_text_format(client, server):
    response = client.responses.create(
        model=server.model, input="A person, please.", temperature=0.0, max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "p", "schema": SCHEMAS[0], "strict": True}})
    jsonschema.validate(json.loads(response.output_text), SCHEMAS[0])
    assert response.text.format.type == "json_schema"


def test_ollama_format_json_and_schema(server):
    client = ollama.Client(host=server.url, timeout=120)
    reply = client.generate(model=server.model, prompt="JSON:", format="json",
                            options={"temperature": 0, "num_predict": 300})
    # "json" means an object, possibly long for a random model: it must at least be a JSON object if complete.
    if reply.done_reason == "stop":
        assert isinstance(json.loads(reply.response), dict)
    else:
        assert reply.response.startswith("{")
    chat = client.chat(model=server.model, messages=[{"role": "user", "content": "A color"}], format=SCHEMAS[1],
                       options={"temperature": 1.0, "seed": 3, "num_predict": 120})
    jsonschema.validate(json.loads(chat.message.content), SCHEMAS[1])
    streamed = "".join(part.message.content for part in client.chat(
        model=server.model, messages=[{"role": "user", "content": "A point"}], format=SCHEMAS[3], stream=True,
        options={"temperature": 0, "num_predict": 120}))
    jsonschema.validate(json.loads(streamed), SCHEMAS[3])


@pytest.mark.parametrize(("path", "fields", "param", "message"), [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "foo"}}}}, "response_format", "Unsupported type"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "type must be"),
    ("/v1/completions", {"grammar": "root ::= missing"}, "grammar", "not defined"),
    ("/v1/completions", {"guided_regex": "a(b"}, "guided_regex", "parenthesis"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", "non-empty"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "disable_any_whitespace": False}}, "structured_outputs",
     "disable_any_whitespace false"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("/v1/completions", {"guided_regex": "a", "grammar": 'root ::= "a"'}, "grammar", "one structured output"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
     "guided_choice", "one structured output"),
])
def test_invalid_constraints_are_400_naming_the_field(server, path, fields, param, message):
    body = {**fields, "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    reply = post(server, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert post(server, "/v1/completions", {"prompt": "still alive", "max_tokens": 2}).status_code == 200


def test_invalid_ollama_format_is_400(server):
    for fmt in ({"type": "foo"}, "yaml"):
        reply = post(server, "/api/generate", {"prompt": "hi", "format": fmt, "stream": False})
        assert reply.status_code == 400 and "format" in reply.json()["error"], reply.text
    reply = post(server, "/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema",
                                                                                "schema": {"type": 3}}}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "text.format", reply.text
