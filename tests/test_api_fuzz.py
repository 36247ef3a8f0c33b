"""API fuzzing: schemathesis generates requests from the server's own /openapi.json (valid bodies and bodies that
break it) for every operation, sends them to a real `ember serve` on 127.0.0.1 and checks each answer: no 5xx,
no hang (a timeout per request), a documented status code and media type, a body that matches the documented
schema, and schema-invalid bodies refused with 4xx. Bounded and derandomized in CI; scripts/fuzz_api.py runs it
longer (EMBER_FUZZ_EXAMPLES, EMBER_FUZZ_SEED). docs/reliability.md#api-fuzzing has the commands and findings."""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks

from ember.server.openapi import NDJSON, ROUTES, SSE
from ember.server.protocol import (
    UNSUPPORTED_FIELDS,
    AnthropicRequest,
    ChatCompletionRequest,
    LlamaCompletionRequest,
)
from tests.server_helpers import start_server

EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "100"))  # per operation
SEED = os.environ.get("EMBER_FUZZ_SEED")  # unset: derandomized (the same examples every run)
REQUEST_TIMEOUT = 30  # seconds; more is a hang
# A short context bounds every generation (max_tokens absent means "to the end of the context").
FUZZ_SERVE_ARGS = ("--max-model-len", "32")
# /api/pull downloads (no network here, and its stream:false errors are fixed on another branch).
EXCLUDED_PATHS = {"/api/pull"}
# Second paths of a handler (same code, same body model): fuzzed by scripts/fuzz_api.py, not in CI.
ALIASES = {("post", "/completions"), ("post", "/v2/rerank"), ("post", "/rerank"), ("post", "/score"),
           ("head", "/ui/{name}")}
FUZZED = [(m, p) for m, p in ROUTES
          if p not in EXCLUDED_PATHS and (os.environ.get("EMBER_FUZZ_ALIASES") or (m, p) not in ALIASES)]
# Operations whose valid examples must reach a 200 at least once (the fuzzer gets past validation to the model).
# Not listed: rerank and score (a chat model answers 400), the store (empty) and the fixed-answer GETs.
REACH_SUCCESS = {("post", p) for p in (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
    "/v1/messages/count_tokens", "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/tokenize",
    "/apply-template", "/completion")} | {("get", "/props"), ("get", "/slots")}
CHECKS = [checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance,
          checks.negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_server():
    server = start_server(None, *FUZZ_SERVE_ARGS, timeout=180)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def session():
    """One connection pool for every request (a session per request would load the CA bundle each time)."""
    with requests.Session() as client:
        yield client


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def stream_without_errors(ctx, response, case) -> None:
    """A 200 stream (SSE or NDJSON) is events of JSON, none of them an error: once its headers are sent, a
    failure can only show as an error event, which the status checks cannot see."""
    media = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not media.startswith((SSE, NDJSON)):
        return
    lines = response.text.splitlines()
    payloads = [line[6:] for line in lines if line.startswith("data: ")] if media.startswith(SSE) else lines
    assert payloads, f"an empty stream: {response.text!r}"
    for payload in payloads:
        if payload == "[DONE]":
            continue
        event = json.loads(payload)
        assert "error" not in event and event.get("type") != "error", f"an error in the stream: {payload}"


def _fuzz_settings(test):
    test = settings(max_examples=EXAMPLES, derandomize=SEED is None, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)(test)
    return test if SEED is None else seed(int(SEED))(test)


# schemathesis's own pytest loader (from_fixture) fails on pytest 9: each operation is a case of its own here.
@pytest.mark.parametrize(("method", "path"), FUZZED, ids=[f"{m.upper()} {p}" for m, p in FUZZED])
def test_fuzz(api_schema, session, method, path):
    operation = api_schema[path][method.upper()]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @_fuzz_settings
    def fuzz(case):
        response = case.call_and_validate(session=session, checks=[not_a_server_error, *CHECKS, stream_without_errors],
                                          timeout=REQUEST_TIMEOUT)
        streamed = response.headers.get("content-type", [""])[0].startswith((SSE, NDJSON))
        statuses[f"{response.status_code} stream" if streamed else response.status_code] += 1

    statuses: Counter = Counter()  # status ("200 stream" for a streamed 200) -> examples
    fuzz()
    print(f"{method.upper()} {path}: {dict(sorted(statuses.items(), key=str))}")
    if (method, path) in REACH_SUCCESS:
        assert statuses[200] + statuses["200 stream"], f"no example reached a 200: {dict(statuses)}"


def test_openapi_document(fuzz_server):
    """The served document is valid OpenAPI 3.1 and lists exactly the app's routes, each with its statuses."""
    document = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    validate(document)
    operations = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert operations == set(ROUTES)
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    errors = {p: ops["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
              for p, ops in document["paths"].items() if "post" in ops}
    assert errors["/api/chat"].endswith("/OllamaError") and errors["/v1/messages"].endswith("/AnthropicError")
    assert errors["/v1/completions"].endswith("/OpenAIError")
    assert [p["name"] for p in document["paths"]["/props"]["get"]["parameters"]] == ["model"]  # was undeclared


def test_stream_check_sees_errors():
    """The stream check fails on an error event (OpenAI's and Ollama's shapes) and passes a clean stream."""
    def reply(media: str, text: str):
        return SimpleNamespace(status_code=200, headers={"content-type": [media]}, text=text)

    stream_without_errors(None, reply(SSE, 'data: {"choices":[]}\n\ndata: [DONE]\n\n'), None)
    with pytest.raises(AssertionError, match="an error in the stream"):
        stream_without_errors(None, reply(SSE, 'data: {"error":{"message":"x"}}\n\ndata: [DONE]\n\n'), None)
    with pytest.raises(AssertionError, match="an error in the stream"):
        stream_without_errors(None, reply(NDJSON, '{"response":"a","done":false}\n{"error":"x"}\n'), None)


def test_unsupported_fields_are_published():
    """A field ember refuses (protocol.UNSUPPORTED_FIELDS) is in the request schema with the values it accepts,
    so a client (and the fuzzer) knows what is answered 400."""
    chat = ChatCompletionRequest.model_json_schema()["properties"]
    assert chat["typical_p"]["enum"] == [None]
    assert chat["service_tier"]["enum"] == ["auto", "default", None]
    llama = LlamaCompletionRequest.model_json_schema()["properties"]
    assert llama["dynatemp_range"]["enum"] == [0, None]  # 0 and 0.0 are one JSON value
    assert llama["penalize_nl"]["enum"] == [False, None]  # and False is not 0
    assert set(UNSUPPORTED_FIELDS["anthropic"]) <= set(AnthropicRequest.model_json_schema()["properties"])


def test_server_survived(fuzz_server):
    """After the fuzzing, the server still answers and generates."""
    reply = httpx.post(f"{fuzz_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
