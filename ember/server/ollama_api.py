"""Ollama-compatible endpoints: generate, chat (NDJSON streams), tags, show, ps, embed, embeddings, version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from ember import __version__
from ember.errors import EmberError, InvalidParameter
from ember.sampling_params import SamplingParams
from ember.server.chat_output import ParsedMessage, arguments_object, parse_whole
from ember.server.chat_plan import ChatPlan, plan_chat
from ember.server.constraints import compile_constraint, ollama_constraint
from ember.server.errors import APIError, bad_request, from_exception, not_supported
from ember.server.generation import Choice, Generation, collect, start_generation
from ember.server.openai_api import available_models, embed_all
from ember.server.pool import parse_keep_alive
from ember.server.prompting import chat_prompt_ids, plain_messages
from ember.server.protocol import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
    _Body,
)
from ember.server.state import ModelEntry, ServerState

router = APIRouter()
NEVER = "2318-01-01T00:00:00Z"  # expires_at of a model kept forever (Ollama's far future)

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
    if getattr(body, "images", None):
        raise not_supported("images", param="images")


async def request_params(engine, body, plan: ChatPlan | None = None) -> SamplingParams:
    """The SamplingParams of a generate/chat body: its options, and its format (or the tool calls `plan`
    requires) compiled (400 if invalid)."""
    params = ollama_params(body.options)
    structured, field = ollama_constraint(body.format) or (None, None)
    if structured is not None:
        params = replace(params, structured=structured)
    if plan is not None:
        params, field = plan.constrain(params, field)
    if params.structured is not None:
        await compile_constraint(engine, params, field)
    return params


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
            yield json.dumps(item) + "\n"  # ASCII-escaped: no raw U+2028 / U+0085 for line splitters to cut at

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def _run(request: Request, generation: Generation, stream: bool, whole, pieces, final_extra) -> Any:
    """Stream NDJSON pieces then the final object, or answer the whole reply at once: `whole(choice)` is the
    reply's body, `pieces(text, finished)` the bodies of a stream's chunks for a piece of text."""
    started = generation.started
    name = generation.model
    if not stream:
        choice = (await collect(request, generation))[0]
        return {**whole(choice), **_final(name, generation, choice, started, 0.0), **final_extra(choice)}

    async def items():
        choice = Choice(0)
        try:
            async with aclosing(generation.stream()) as outputs:
                async for _, out in outputs:
                    choice.add(out)
                    for piece in pieces(out.text_delta, out.finished):
                        yield {"model": name, "created_at": now(), **piece, "done": False}
        except (EmberError, APIError) as err:
            yield {"error": from_exception(err).message}
            return
        yield {**whole(Choice(0)), **_final(name, generation, choice, started, 0.0), **final_extra(choice)}

    return _ndjson(items())


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    state = get_state(request)
    check_request(body)
    if not body.prompt and not body.context and _is_zero(body.keep_alive):  # Ollama's "unload the model" request
        name = await state.pool.stop(body.model)
        return {"model": name, "created_at": now(), "response": "", "done": True, "done_reason": "unload"}
    entry = await state.use_model(request, body.model, body.keep_alive)
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
    generation = start_generation(state, entry, [prompt], await request_params(engine, body), "ollama")
    return await _run(request, generation, body.stream, lambda choice: {"response": choice.text},
                      lambda text, _: [{"response": text}] if text else [],
                      lambda choice: {"context": prompt + choice.token_ids})


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    state = get_state(request)
    check_request(body)
    if any(m.images for m in body.messages):
        raise not_supported("images", param="messages")
    if not body.messages and _is_zero(body.keep_alive):
        name = await state.pool.stop(body.model)
        return {"model": name, "created_at": now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "unload"}
    entry = await state.use_model(request, body.model, body.keep_alive)
    if not body.messages:
        return {"model": entry.name, "created_at": now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    plan = plan_chat(entry.engine, plain_messages(_with_call_ids(body.messages)), body.tools,
                     template_kwargs={"reasoning_effort": body.think} if isinstance(body.think, str) else None,
                     think=None if body.think is None else bool(body.think))
    generation = start_generation(state, entry, [plan.prompt], await request_params(entry.engine, body, plan),
                                  "ollama")
    parser, parsed = plan.parser(), ParsedMessage()

    def pieces(text: str, finished: bool) -> list[dict]:
        events = parser.feed(text) + (parser.finish() if finished else [])
        parsed.add(events)
        return [{"message": _message(delta)} for delta in _ollama_deltas(events, parsed)]

    return await _run(request, generation, body.stream,
                      lambda choice: {"message": _message(parse_whole(plan.parser(), choice.text))}, pieces,
                      lambda choice: {})


def _message(parsed: ParsedMessage) -> dict:
    """Ollama's message: content, thinking, and tool calls with their arguments as objects (a call whose
    arguments are not an object, cut short by the token limit, is left out)."""
    message = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning:
        message["thinking"] = parsed.reasoning
    calls = [(i, c, arguments_object(c["arguments"])) for i, c in enumerate(parsed.calls)]
    calls = [{"function": {"index": i, "name": c["name"], "arguments": args}} for i, c, args in calls if args is not None]
    if calls:
        message["tool_calls"] = calls
    return message


def _ollama_deltas(events: list[tuple], parsed: ParsedMessage) -> list[ParsedMessage]:
    """Stream chunks as Ollama sends them: text and thinking as they come, each tool call once complete."""
    deltas = []
    for event in events:
        if event[0] == "content":
            deltas.append(ParsedMessage(content=event[1]))
        elif event[0] == "reasoning":
            deltas.append(ParsedMessage(reasoning=event[1]))
        elif event[0] == "call_done":
            deltas.append(ParsedMessage(calls=[parsed.calls[event[1]]]))
    return deltas


def _with_call_ids(messages: list) -> list[dict]:
    """Ollama's tool calls carry no ids, which some templates (Mistral's) need to pair a result with its call:
    each call gets one, and each tool result the id of the next unanswered call."""
    plain, waiting, count = [], [], 0
    for message in messages:
        data = message.model_dump(exclude_none=True)
        if data.get("tool_calls"):
            calls = []
            for call in data["tool_calls"]:
                if isinstance(call, dict) and "id" not in call:
                    count += 1
                    call = {"id": f"call{count:05d}", **call}  # 9 alphanumerics, as Mistral templates insist
                calls.append(call)
                waiting.append(call.get("id") if isinstance(call, dict) else None)
            data["tool_calls"] = calls
        elif data.get("role") == "tool" and "tool_call_id" not in data and waiting:
            data["tool_call_id"] = waiting.pop(0)
        plain.append(data)
    return plain


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


def _is_zero(keep_alive) -> bool:
    """keep_alive 0 (Ollama's "unload now")."""
    if isinstance(keep_alive, bool) or keep_alive is None:
        return False
    try:
        return parse_keep_alive(keep_alive) == 0
    except APIError:
        return False


def _tag(entry: ModelEntry) -> dict:
    name = entry.name if ":" in entry.name.rsplit("/", 1)[-1] else f"{entry.name}:latest"
    return {"name": name, "model": name,
            "modified_at": datetime.fromtimestamp(entry.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": _size(entry), "digest": hashlib.sha256(entry.name.encode()).hexdigest(), "details": _details(entry)}


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _available_tag(model) -> dict:
    name = model.name if ":" in model.name.rsplit("/", 1)[-1] else f"{model.name}:latest"
    family = getattr(model, "architecture", None) or "unknown"
    return {"name": name, "model": name, "modified_at": _rfc3339(model.modified), "size": model.size,
            "digest": hashlib.sha256(model.name.encode()).hexdigest(),
            "details": {"parent_model": "", "format": model.format, "family": family, "families": [family],
                        "parameter_size": _human(model.parameters) if model.parameters else "",
                        "quantization_level": model.quant or ""}}


@router.get("/api/tags")
async def tags(request: Request):
    state = get_state(request)
    loaded = state.pool.list()
    names = {e.name for e in loaded}
    return {"models": [_tag(e) for e in loaded]
            + [_available_tag(m) for m in await available_models(state) if m.name not in names]}


@router.get("/api/ps")
async def ps(request: Request):
    models = []
    for entry in get_state(request).pool.list():
        expires = entry.expires_at
        models.append({**_tag(entry), "size": entry.size, "size_vram": entry.size if entry.device != "cpu" else 0,
                       "expires_at": _rfc3339(expires) if expires is not None else NEVER,
                       "context_length": entry.context_length, "context_fitted": entry.context_fitted,
                       "busy": entry.busy})
    return {"models": models}


def _model_name(body) -> str:
    """Ollama's model field, under its current name `model` or the older `name`."""
    name = body.model or body.name
    if not name:
        raise bad_request("model: this field is required", param="model")
    return name


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    from ember.store.info import describe_path

    name = _model_name(body)
    pool = get_state(request).pool
    key, resolved = await pool.lookup(name)
    entry = pool.loaded(key)
    info: dict[str, Any] = {}
    if resolved is not None:
        try:
            info = await asyncio.to_thread(describe_path, resolved.path)
        except EmberError as err:
            raise APIError(500, f"cannot read {key}: {err}", code="unreadable_model") from None
    family = info.get("architecture") or (_details(entry)["family"] if entry is not None else "unknown")
    details = {"parent_model": "", "format": resolved.format if resolved is not None else "safetensors",
               "family": family, "families": [family],
               "parameter_size": _human(info["parameters"]) if info.get("parameters") else "",
               "quantization_level": info.get("quant") or ""}
    if entry is not None and not info:
        details = _details(entry)
    template = info.get("template") or ""
    if entry is not None and entry.engine.chat_template is not None:
        template = entry.engine.chat_template.source
    context = info.get("context_length") or (entry.context_length if entry is not None else None)
    model_info: dict[str, Any] = {"general.architecture": family}
    if info.get("parameters"):
        model_info["general.parameter_count"] = info["parameters"]
    if context:
        model_info[f"{family}.context_length"] = context
    modified = (entry.created if entry is not None else
                (resolved.path.stat().st_mtime if resolved is not None and resolved.path.exists() else time.time()))
    return {"modelfile": f"FROM {key}\n", "parameters": "", "license": info.get("license") or "",
            "template": template, "details": details, "modified_at": _rfc3339(modified),
            "model_info": model_info, "capabilities": ["completion", "embedding"]}


# --- the store: pull, delete, copy --------------------------------------------------------------------------
class PullRequest(_Body):
    model: str | None = None
    name: str | None = None
    insecure: bool = False
    stream: bool = True


class DeleteRequest(_Body):
    model: str | None = None
    name: str | None = None


class CopyRequest(_Body):
    source: str
    destination: str


def _store_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    message = str(err)
    missing = any(w in message for w in ("not found", "is not in the store", "does not exist"))
    return APIError(404 if missing else 400, message, code="store_error")


@router.post("/api/pull")
async def pull(body: PullRequest, request: Request):
    ref = _model_name(body)
    from ember.store.names import parse_ref

    try:
        parse_ref(ref, allow_paths=False)
    except EmberError as err:
        raise bad_request(str(err), param="model") from None
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()

    def echo(text: str) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, {"status": text})

    def work():
        from ember.store.pull import pull as pull_model

        return pull_model(ref, progress=False, echo=echo)

    async def items():
        yield {"status": "pulling manifest"}
        task = asyncio.ensure_future(asyncio.to_thread(work))
        while True:
            getter = asyncio.ensure_future(lines.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not lines.empty():
                yield lines.get_nowait()
            break
        try:
            manifest = task.result()
        except Exception as err:
            yield {"error": str(err) if isinstance(err, EmberError) else f"pull failed: {err}"}
            return
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success", "model": manifest.name, "total": manifest.size}

    if body.stream:
        return _ndjson(items())
    last: dict = {}
    async for item in items():
        last = item
    if "error" in last:
        raise APIError(500, last["error"], code="pull_failed")
    return last


@router.delete("/api/delete")
async def delete(body: DeleteRequest, request: Request):
    name = _model_name(body)
    from ember.store.store import ModelStore

    pool = get_state(request).pool
    try:
        store = ModelStore()
        stored = await asyncio.to_thread(store.get, name)
        if pool.loaded(stored.name) is not None:
            await pool.stop(stored.name)
        await asyncio.to_thread(store.remove, name)
    except EmberError as err:
        raise _store_error(err) from None
    return Response(status_code=200)


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request):
    from ember.store.store import ModelStore

    try:
        store = ModelStore()
        await asyncio.to_thread(store.copy, body.source, body.destination)
    except EmberError as err:
        raise _store_error(err) from None
    return Response(status_code=200)


# --- embeddings ---------------------------------------------------------------------------------------------
def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


@router.post("/api/embed")
async def embed(body: OllamaEmbedRequest, request: Request):
    state = get_state(request)
    if body.dimensions is not None:
        raise not_supported("dimensions", param="dimensions")
    entry = await state.use_model(request, body.model, body.keep_alive)
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
    entry = await state.use_model(request, body.model, body.keep_alive)
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
