"""The published OpenAPI document (GET /openapi.json). Request bodies are the JSON schemas of the protocol models
that validate them (ember.server.protocol, derived by FastAPI), fields refused with 400 included; this module adds
what each route answers: its 200 body and media types, and the error statuses it can return with the error body
of its API family (ember.server.errors). tests/test_api_fuzz.py holds the server to this document."""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ember import __version__
from ember.server.errors import is_anthropic_path, is_ollama_path

JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


def _obj(required: tuple[str, ...] = (), **properties: Any) -> dict:
    """An object schema: these properties (others allowed), `required` among them."""
    return {"type": "object", "required": list(required), "properties": properties}


def _array(items: dict) -> dict:
    return {"type": "array", "items": items}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
COUNT = {"type": "integer", "minimum": 0}
ANY_OBJECT = {"type": "object"}
VECTOR = _array(NUMBER)

# --- error bodies (ember.server.errors.error_body) -----------------------------------------------------------
ERROR_SCHEMAS = {
    "OpenAIError": _obj(("error",), error=_obj(
        ("message", "type", "param", "code"), message=STRING, type=STRING, param=_nullable(STRING),
        code=_nullable(STRING))),
    "OllamaError": _obj(("error",), error=STRING),
    "AnthropicError": _obj(("type", "error"), type={"const": "error"},
                           error=_obj(("type", "message"), type=STRING, message=STRING)),
}
_WHY = {400: "invalid request (body, field, Host header)", 401: "invalid or missing API key",
        403: "forbidden: a protected model name, or run-time LoRA loading is off (--runtime-lora)",
        404: "unknown model, adapter, file or endpoint", 409: "the LoRA adapter is in use by running requests", 413: "request body over the server's --max-body limit",
        503: "busy (queue full), loading, out of memory or shutting down; Retry-After says when to retry"}


def _error_schema(path: str) -> str:
    if is_ollama_path(path):
        return "OllamaError"
    return "AnthropicError" if is_anthropic_path(path) else "OpenAIError"


# --- 200 bodies ---------------------------------------------------------------------------------------------
USAGE = _obj(("prompt_tokens", "completion_tokens", "total_tokens"), prompt_tokens=COUNT, completion_tokens=COUNT,
             total_tokens=COUNT)
CHAT_COMPLETION = _obj(
    ("id", "object", "created", "model", "choices", "usage"), id=STRING, object={"const": "chat.completion"},
    created=INTEGER, model=STRING, usage=USAGE, choices=_array(_obj(
        ("index", "message", "finish_reason"), index=COUNT, finish_reason=_nullable(STRING),
        logprobs=_nullable(ANY_OBJECT), message=_obj(
            ("role", "content"), role={"const": "assistant"}, content=_nullable(STRING),
            reasoning_content=_nullable(STRING), tool_calls=_array(ANY_OBJECT)))))
COMPLETION = _obj(
    ("id", "object", "created", "model", "choices", "usage"), id=STRING, object={"const": "text_completion"},
    created=INTEGER, model=STRING, usage=USAGE, choices=_array(_obj(
        ("index", "text", "finish_reason"), index=COUNT, text=STRING, finish_reason=_nullable(STRING),
        logprobs=_nullable(_obj(("tokens", "token_logprobs", "top_logprobs", "text_offset"),
                                tokens=_array(STRING), token_logprobs=_array(_nullable(NUMBER)),
                                top_logprobs=_array(_nullable(ANY_OBJECT)), text_offset=_array(COUNT))))))
MODEL_CARD = _obj(("id", "object", "created", "owned_by"), id=STRING, object={"const": "model"}, created=INTEGER,
                  owned_by=STRING, meta=ANY_OBJECT)
MODEL_LIST = _obj(("object", "data"), object={"const": "list"}, data=_array(MODEL_CARD))
EMBEDDINGS = _obj(
    ("object", "data", "model", "usage"), object={"const": "list"}, model=STRING,
    usage=_obj(("prompt_tokens", "total_tokens"), prompt_tokens=COUNT, total_tokens=COUNT),
    data=_array(_obj(("object", "index", "embedding"), object={"const": "embedding"}, index=COUNT,
                     embedding={"anyOf": [VECTOR, STRING]})))  # STRING: encoding_format base64
RESPONSE = _obj(
    ("id", "object", "created_at", "status", "model", "output"), id=STRING, object={"const": "response"},
    created_at=INTEGER, status={"enum": ["completed", "incomplete", "in_progress"]}, model=STRING,
    output=_array(_obj(("type",), type=STRING)), usage=_nullable(_obj(
        ("input_tokens", "output_tokens", "total_tokens"), input_tokens=COUNT, output_tokens=COUNT,
        total_tokens=COUNT)))
RERANK = _obj(("id", "model", "results", "usage"), id=STRING, model=STRING, usage=ANY_OBJECT, results=_array(_obj(
    ("index", "relevance_score"), index=COUNT, relevance_score=NUMBER, document=_obj(("text",), text=STRING))))
SCORE = _obj(("id", "object", "created", "model", "data", "usage"), id=STRING, object={"const": "list"},
             created=INTEGER, model=STRING, usage=ANY_OBJECT,
             data=_array(_obj(("index", "object", "score"), index=COUNT, object={"const": "score"}, score=NUMBER)))
ANTHROPIC_MESSAGE = _obj(
    ("id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"), id=STRING,
    type={"const": "message"}, role={"const": "assistant"}, model=STRING,
    content=_array(_obj(("type", "text"), type={"const": "text"}, text=STRING)),
    stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence"]}, stop_sequence=_nullable(STRING),
    usage=_obj(("input_tokens", "output_tokens"), input_tokens=COUNT, output_tokens=COUNT))
OLLAMA_REPLY = _obj(("model", "created_at", "done"), model=STRING, created_at=STRING, done=BOOLEAN,
                    done_reason=STRING, response=STRING, message=ANY_OBJECT, context=_array(COUNT),
                    prompt_eval_count=COUNT, eval_count=COUNT, total_duration=COUNT, load_duration=COUNT)
OLLAMA_MODELS = _obj(("models",), models=_array(_obj(("name", "model"), name=STRING, model=STRING)))
LLAMA_COMPLETION = _obj(("content", "stop"), content=STRING, stop=BOOLEAN, tokens=_array(COUNT), model=STRING,
                        tokens_predicted=COUNT, tokens_evaluated=COUNT)
SLOT = _obj(("id", "n_ctx", "is_processing"), id=COUNT, n_ctx=COUNT, is_processing=BOOLEAN, params=ANY_OBJECT)

# (method, path) -> (200 body schema or None, media types of a 200, error statuses beside 400 and 401)
MODEL = (404, 503)  # routes that use a model: unknown, or busy / loading / out of memory
WITH_BODY = (413,)
ROUTES: dict[tuple[str, str], tuple[dict | None, tuple[str, ...], tuple[int, ...]]] = {
    ("get", "/"): (STRING, ("text/plain", "text/html"), ()),
    ("head", "/"): (None, ("text/plain",), ()),
    ("get", "/ui/{name}"): (None, ("text/javascript", "text/css"), (404,)),
    ("head", "/ui/{name}"): (None, ("text/javascript", "text/css"), (404,)),
    ("get", "/v1/models"): (MODEL_LIST, (JSON,), ()),
    ("get", "/v1/models/{model_id}"): (MODEL_CARD, (JSON,), (404,)),
    ("post", "/v1/chat/completions"): (CHAT_COMPLETION, (JSON, SSE), MODEL + WITH_BODY),
    ("post", "/v1/completions"): (COMPLETION, (JSON, SSE), MODEL + WITH_BODY),
    ("post", "/v1/embeddings"): (EMBEDDINGS, (JSON,), MODEL + WITH_BODY),
    ("post", "/v1/responses"): (RESPONSE, (JSON, SSE), MODEL + WITH_BODY),
    ("post", "/v1/rerank"): (RERANK, (JSON,), MODEL + WITH_BODY),
    ("post", "/v2/rerank"): (RERANK, (JSON,), MODEL + WITH_BODY),
    ("post", "/rerank"): (RERANK, (JSON,), MODEL + WITH_BODY),
    ("post", "/v1/score"): (SCORE, (JSON,), MODEL + WITH_BODY),
    ("post", "/score"): (SCORE, (JSON,), MODEL + WITH_BODY),
    ("post", "/v1/messages"): (ANTHROPIC_MESSAGE, (JSON, SSE), MODEL + WITH_BODY),
    ("post", "/v1/messages/count_tokens"): (_obj(("input_tokens",), input_tokens=COUNT), (JSON,), MODEL + WITH_BODY),
    ("post", "/api/generate"): (OLLAMA_REPLY, (JSON, NDJSON), MODEL + WITH_BODY),
    ("post", "/api/chat"): (OLLAMA_REPLY, (JSON, NDJSON), MODEL + WITH_BODY),
    ("get", "/api/tags"): (OLLAMA_MODELS, (JSON,), ()),
    ("get", "/api/ps"): (OLLAMA_MODELS, (JSON,), ()),
    ("post", "/api/show"): (_obj(("modelfile", "details", "model_info"), modelfile=STRING, details=ANY_OBJECT,
                                 model_info=ANY_OBJECT, capabilities=_array(STRING)), (JSON,), MODEL + WITH_BODY),
    ("post", "/api/pull"): (_obj(("status",), status=STRING), (JSON, NDJSON), (404, 500) + WITH_BODY),
    ("delete", "/api/delete"): (None, (), (403, 404) + WITH_BODY),
    ("post", "/api/copy"): (None, (), (403, 404) + WITH_BODY),
    ("post", "/api/embed"): (_obj(("model", "embeddings"), model=STRING, embeddings=_array(VECTOR),
                                  prompt_eval_count=COUNT), (JSON,), MODEL + WITH_BODY),
    ("post", "/api/embeddings"): (_obj(("embedding",), embedding=VECTOR), (JSON,), MODEL + WITH_BODY),
    ("get", "/api/version"): (_obj(("version",), version=STRING), (JSON,), ()),
    ("get", "/health"): (_obj(("status",), status=STRING), (JSON,), (503,)),
    ("post", "/tokenize"): (_obj(("tokens",), tokens=_array({"anyOf": [COUNT, _obj(
        ("id", "piece"), id=COUNT, piece=STRING)]})), (JSON,), MODEL + WITH_BODY),
    ("post", "/detokenize"): (_obj(("content",), content=STRING), (JSON,), MODEL + WITH_BODY),
    ("post", "/apply-template"): (_obj(("prompt",), prompt=STRING), (JSON,), MODEL + WITH_BODY),
    ("get", "/metrics"): (None, ("text/plain",), ()),
    ("post", "/completion"): (LLAMA_COMPLETION, (JSON, SSE), MODEL + WITH_BODY),
    ("post", "/completions"): (LLAMA_COMPLETION, (JSON, SSE), MODEL + WITH_BODY),
    ("get", "/props"): (_obj(("default_generation_settings", "total_slots"), default_generation_settings=SLOT,
                             total_slots=COUNT, chat_template=STRING), (JSON,), MODEL),
    ("get", "/slots"): (_array(SLOT), (JSON,), MODEL),
    ("post", "/v1/load_lora_adapter"): (STRING, ("text/plain",), (403,) + MODEL + WITH_BODY),
    ("post", "/v1/unload_lora_adapter"): (STRING, ("text/plain",), (403, 404, 409) + WITH_BODY),
}
OPEN_ROUTES = {"/health", "/", "/ui/{name}"}  # answered without the API key (ember.server.app)


def _responses(method: str, path: str) -> dict:
    body, media_types, statuses = ROUTES[(method, path)]
    ok: dict = {"description": "success"}
    if media_types:
        ok["content"] = {m: ({"schema": body} if body is not None and m in (JSON, "text/plain", "text/html") else {})
                         for m in media_types}
    reference = {"$ref": f"#/components/schemas/{_error_schema(path)}"}
    codes = {400, *statuses} | (set() if path in OPEN_ROUTES else {401})
    errors = {str(code): {"description": _WHY.get(code, "the server could not finish the request"),
                          "content": {JSON: {"schema": reference}}} for code in sorted(codes)}
    return {"200": ok, **errors}


def openapi_document(app: FastAPI) -> dict:
    """The app's OpenAPI 3.1 document: FastAPI's request schemas, ember's status codes and bodies. Every route
    must be listed in ROUTES (tests/test_api_fuzz.py checks both ways)."""
    with warnings.catch_warnings():  # GET and HEAD of one handler share an id: every id is replaced below
        warnings.filterwarnings("ignore", message="Duplicate Operation ID")
        document = get_openapi(title="ember", version=__version__, routes=app.routes,
                               description="OpenAI, Anthropic, Ollama and llama.cpp-style APIs of `ember serve`")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            operation["operationId"] = f"{method}:{path}"
            operation["responses"] = _responses(method, path)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(ERROR_SCHEMAS)
    return document


def install(app: FastAPI) -> None:
    app.openapi = lambda: app.openapi_schema or _cache(app)


def _cache(app: FastAPI) -> dict:
    app.openapi_schema = openapi_document(app)
    return app.openapi_schema
