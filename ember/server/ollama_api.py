"""Ollama-compatible endpoints: generate, chat (NDJSON streams), tags, show, ps, embed, embeddings, version."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from ember import __version__
from ember.errors import EmberError, InvalidParameter
from ember.sampling_params import SamplingParams
from ember.server.errors import APIError, bad_request, from_exception, not_supported
from ember.server.generation import Choice, Generation, collect, start_generation
from ember.server.openai_api import embed_all
from ember.server.prompting import chat_prompt_ids, plain_messages
from ember.server.protocol import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)
from ember.server.state import ModelEntry, ServerState

router = APIRouter()

# Ollama option -> SamplingParams field; the others (num_ctx, mirostat, num_thread...) are accepted and ignored.
OPTION_MAP = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
              "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}


def get_state(request: Request) -> ServerState:
    return request.app.state.ember


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_params(options: dict[str, Any] | None) -> SamplingParams:
    options = options or {}
    kwargs: dict[str, Any] = dict(DEFAULTS)
    for key, value in options.items():
        if key in OPTION_MAP:
            if value is not None:
                kwargs[OPTION_MAP[key]] = value
        elif key == "num_predict":
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidParameter("num_predict", f"must be an integer, got {value!r}")
            kwargs["max_tokens"] = None if value < 0 else value  # -1: unlimited, -2: fill the context
            if value == 0:
                raise InvalidParameter("num_predict", "must be positive, or -1 for no limit")
    kwargs.setdefault("max_tokens", None)
    return SamplingParams(**kwargs)


def check_request(body) -> None:
    if body.format is not None and body.format != "":
        raise not_supported("format (structured output)", param="format")
    if getattr(body, "images", None):
        raise not_supported("images", param="images")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _final(entry_name: str, generation: Generation, choice: Choice, started: float, load: float) -> dict:
    end = time.monotonic()
    first = choice.first_token_at or end
    return {"model": entry_name, "created_at": now(), "done": True,
            "done_reason": choice.finish_reason or "stop",
            "total_duration": _ns(end - started), "load_duration": _ns(load),
            "prompt_eval_count": choice.prompt_tokens, "prompt_eval_duration": _ns(first - started),
            "eval_count": choice.completion_tokens, "eval_duration": _ns(end - first)}


def _ndjson(items: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for item in items:
            yield json.dumps(item, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def _run(request: Request, generation: Generation, stream: bool, piece, final_extra) -> Any:
    """Stream NDJSON pieces then the final object, or answer the whole reply at once."""
    started = generation.started
    name = generation.model
    if not stream:
        choice = (await collect(request, generation))[0]
        return {**piece(choice.text), **_final(name, generation, choice, started, 0.0), **final_extra(choice)}

    async def items():
        choice = Choice(0)
        try:
            async with aclosing(generation.stream()) as outputs:
                async for _, out in outputs:
                    choice.add(out)
                    if out.text_delta:
                        yield {"model": name, "created_at": now(), **piece(out.text_delta), "done": False}
        except (EmberError, APIError) as err:
            yield {"error": from_exception(err).message}
            return
        yield {**piece(""), **_final(name, generation, choice, started, 0.0), **final_extra(choice)}

    return _ndjson(items())


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    state = get_state(request)
    check_request(body)
    entry = state.registry.entry(body.model)
    if not body.prompt and not body.context:  # Ollama's "load the model" request
        return {"model": entry.name, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
    if body.suffix:
        raise not_supported("suffix (fill-in-the-middle)", param="suffix")
    engine = entry.engine
    if body.raw or engine.chat_template is None:
        prompt = engine.tokenizer.encode(body.prompt or "", add_special_tokens=not body.context)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else [])
        prompt = chat_prompt_ids(engine, [*messages, {"role": "user", "content": body.prompt or ""}])
    prompt = list(body.context or []) + prompt
    generation = start_generation(state, entry.name, [prompt], ollama_params(body.options), "ollama")
    return await _run(request, generation, body.stream, lambda text: {"response": text},
                      lambda choice: {"context": prompt + choice.token_ids})


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    state = get_state(request)
    check_request(body)
    if any(m.images for m in body.messages):
        raise not_supported("images", param="messages")
    entry = state.registry.entry(body.model)
    if not body.messages:
        return {"model": entry.name, "created_at": now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    prompt = chat_prompt_ids(entry.engine, plain_messages(body.messages), body.tools)
    generation = start_generation(state, entry.name, [prompt], ollama_params(body.options), "ollama")
    return await _run(request, generation, body.stream,
                      lambda text: {"message": {"role": "assistant", "content": text}}, lambda choice: {})


# --- models -------------------------------------------------------------------------------------------------
def _details(entry: ModelEntry) -> dict:
    loaded = getattr(entry.engine.engine, "loaded", None)
    config = getattr(loaded, "config", None)
    family = getattr(config, "architecture", None) or "unknown"
    params = None
    model = getattr(loaded, "model", None)
    if model is not None and hasattr(model, "parameters"):
        params = sum(p.numel() for p in model.parameters())
    fmt = str(getattr(loaded, "format", "") or "")
    return {"parent_model": "", "format": fmt or "safetensors", "family": family, "families": [family],
            "parameter_size": _human(params) if params else "", "quantization_level": str(
                getattr(loaded, "dtype", "")).removeprefix("torch.")}


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _size(entry: ModelEntry) -> int:
    model = getattr(getattr(entry.engine.engine, "loaded", None), "model", None)
    if model is None or not hasattr(model, "parameters"):
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _tag(entry: ModelEntry) -> dict:
    return {"name": f"{entry.name}:latest", "model": f"{entry.name}:latest",
            "modified_at": datetime.fromtimestamp(entry.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": _size(entry), "digest": hashlib.sha256(entry.name.encode()).hexdigest(), "details": _details(entry)}


@router.get("/api/tags")
async def tags(request: Request):
    return {"models": [_tag(e) for e in get_state(request).registry.list()]}


@router.get("/api/ps")
async def ps(request: Request):
    expires = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    return {"models": [{**_tag(e), "expires_at": expires, "size_vram": 0,
                        "context_length": e.engine.max_model_len} for e in get_state(request).registry.list()]}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    name = body.model or body.name
    if not name:
        raise bad_request("model: this field is required", param="model")
    entry = get_state(request).registry.entry(name)
    template = entry.engine.chat_template
    details = _details(entry)
    return {"modelfile": f"FROM {entry.name}\n", "parameters": "", "license": "",
            "template": template.source if template is not None else "",
            "details": details, "modified_at": _tag(entry)["modified_at"],
            "model_info": {"general.architecture": details["family"],
                           f"{details['family']}.context_length": entry.engine.max_model_len},
            "capabilities": ["completion", "embedding"]}


# --- embeddings ---------------------------------------------------------------------------------------------
def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


@router.post("/api/embed")
async def embed(body: OllamaEmbedRequest, request: Request):
    state = get_state(request)
    if body.dimensions is not None:
        raise not_supported("dimensions", param="dimensions")
    entry = state.registry.entry(body.model)
    started = time.monotonic()
    texts = [body.input] if isinstance(body.input, str) else body.input
    tokenizer = entry.engine.tokenizer
    inputs = [tokenizer.encode(t) for t in texts]
    if body.truncate:
        limit = entry.engine.max_model_len - 1
        inputs = [ids[:limit] for ids in inputs]
    vectors = await embed_all(state, entry, inputs) if inputs else []
    return {"model": entry.name, "embeddings": [_normalized(v) for v in vectors],
            "total_duration": _ns(time.monotonic() - started), "load_duration": 0,
            "prompt_eval_count": sum(len(i) for i in inputs)}


@router.post("/api/embeddings")
async def embeddings(body: OllamaEmbeddingsRequest, request: Request):
    state = get_state(request)
    entry = state.registry.entry(body.model)
    if not body.prompt:
        return {"embedding": []}
    vector = (await embed_all(state, entry, [entry.engine.tokenizer.encode(body.prompt)]))[0]
    return {"embedding": vector}


@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse)
async def root():
    return "ember is running"
