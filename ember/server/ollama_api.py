"""Ollama-compatible endpoints: generate, chat (NDJSON streams), tags, show, ps, embed, embeddings, version."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from ember import __version__
from ember.engine.outputs import StepOutput
from ember.errors import EmberError, ProtectedModel
from ember.sampling_params import SamplingParams
from ember.server.chat_output import ParsedMessage, arguments_object, parse_whole
from ember.server.chat_plan import ChatPlan, plan_chat
from ember.server.constraints import ollama_constraint, with_constraint
from ember.server.errors import APIError, bad_request, not_supported
from ember.server.generation import Choice, Generation, collect, drive, start_generation
from ember.server.keep_alive import parse_keep_alive
from ember.server.offload import off_loop
from ember.server.ollama_options import check_options, num_ctx, ollama_params
from ember.server.openai_api import available_models, embed_all, encoder_embeddings
from ember.server.prompting import chat_prompt_ids, encode_prompt, plain_messages
from ember.server.protocol import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
    _Body,
)
from ember.server.state import LOAD_SECONDS, ModelEntry, ServerState
from ember.store.info import format_params
from ember.store.model_info import ModelInfo, describe_model, gguf_metadata_verbose
from ember.store.names import refuse_reserved

router = APIRouter()
log = logging.getLogger("ember.server")
NEVER = "2318-01-01T00:00:00Z"  # expires_at of a model kept forever (Ollama's far future)

def get_state(request: Request) -> ServerState:
    return request.app.state.ember


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def check_request(body) -> None:
    if getattr(body, "images", None):
        raise not_supported("images", param="images")


async def request_params(entry: ModelEntry, options: dict, body, plan: ChatPlan | None = None) -> SamplingParams:
    """The SamplingParams of a generate/chat body: its options over the model's defaults, and its format (or the
    tool calls `plan` requires) compiled (400 if invalid)."""
    params, constraint = _params(entry, options), ollama_constraint(body.format)
    if plan is not None:
        params, constraint = plan.sampling(params), plan.constrain(constraint)
    return await with_constraint(entry.engine, params, constraint)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _final(entry_name: str, generation: Generation, choice: Choice, started: float, load: float) -> dict:
    end = time.monotonic()
    first = choice.first_token_at or end
    return {"model": entry_name, "created_at": now(), "done": True,
            "done_reason": choice.finish_reason or "stop",
            "total_duration": _ns(end - started + load), "load_duration": _ns(load),
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
    load = request.scope.get(LOAD_SECONDS, 0.0)
    if not stream:
        choice = (await collect(request, generation))[0]
        return {**whole(choice), **_final(name, generation, choice, started, load), **final_extra(choice)}

    def each(_: int, out: StepOutput, __) -> list[dict]:
        return [{"model": name, "created_at": now(), **piece, "done": False}
                for piece in pieces(out.text_delta, out.finished)]

    def done(choices: list[Choice]) -> list[dict]:
        choice = choices[0]
        return [{**whole(Choice(0)), **_final(name, generation, choice, started, load), **final_extra(choice)}]

    return _ndjson(drive(generation, each, lambda api: [{"error": api.message}], done))


def _load_durations(request: Request) -> dict:
    """A load-only request's timings: all of it was getting the model ready."""
    load = _ns(request.scope.get(LOAD_SECONDS, 0.0))
    return {"total_duration": load, "load_duration": load}


def _params(entry: ModelEntry, options: dict):
    return ollama_params(options, entry.info.defaults if entry.info is not None else None)


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    state = get_state(request)
    check_request(body)
    if not body.prompt and not body.context and _is_zero(body.keep_alive):  # Ollama's "unload the model" request
        name = await state.pool.stop(body.model)
        return {"model": name, "created_at": now(), "response": "", "done": True, "done_reason": "unload"}
    options = check_options(body.options)
    entry = await state.use_model(request, body.model, body.keep_alive, num_ctx(options))
    if not body.prompt and not body.context:  # Ollama's "load the model" request
        return {"model": entry.name, "created_at": now(), "response": "", "done": True, "done_reason": "load",
                **_load_durations(request)}
    if body.suffix:
        raise not_supported("suffix (fill-in-the-middle)", param="suffix")
    engine = entry.engine
    if body.raw or engine.chat_template is None:
        prompt = await off_loop(request, lambda: encode_prompt(engine, body.prompt or "",
                                                               add_special_tokens=not body.context))
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else [])
        prompt = await off_loop(request, lambda: chat_prompt_ids(
            engine, [*messages, {"role": "user", "content": body.prompt or ""}]))
    prompt = list(body.context or []) + prompt
    generation = start_generation(request, entry, [prompt], await request_params(entry, options, body), "ollama")
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
    options = check_options(body.options)
    entry = await state.use_model(request, body.model, body.keep_alive, num_ctx(options))
    if not body.messages:
        return {"model": entry.name, "created_at": now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load", **_load_durations(request)}
    plan = await off_loop(request, lambda: plan_chat(
        entry.engine, plain_messages(_with_call_ids(body.messages)), body.tools,
        template_kwargs={"reasoning_effort": body.think} if isinstance(body.think, str) else None,
        think=None if body.think is None else bool(body.think)))
    generation = start_generation(request, entry, [plan.prompt], await request_params(entry, options, body, plan),
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


# --- models: each renders a ModelInfo (ember.store.model_info) ------------------------------------------------
# SamplingParams field -> the Ollama parameter name /api/show reports it under
PARAMETER_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repetition_penalty": "repeat_penalty", "repetition_window": "repeat_last_n"}


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _tag_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _details(info: ModelInfo) -> dict:
    details = {"parent_model": "", "format": info.format, "family": info.family or "",
               "families": [info.family] if info.family else None,
               "parameter_size": format_params(info.parameters) if info.parameters else "",
               "quantization_level": info.quantization or ""}
    return details


def _model_tag(name: str, info: ModelInfo | None, modified: float) -> dict:
    """An /api/tags entry; a model without files (built in-process) has no size, digest or details to report."""
    tag = {"name": _tag_name(name), "model": _tag_name(name), "modified_at": _rfc3339(modified)}
    if info is not None:
        tag.update(size=info.size, digest=info.digest, details=_details(info))
    return tag


def _is_zero(keep_alive) -> bool:
    """keep_alive 0 (Ollama's "unload now")."""
    if isinstance(keep_alive, bool) or keep_alive is None:
        return False
    try:
        return parse_keep_alive(keep_alive) == 0
    except APIError:
        return False


def _available_info(model) -> ModelInfo | None:
    """The ModelInfo of a model listed by the catalog (not loaded); None when its files are unreadable."""
    from ember.store.store import ModelStore

    try:
        path = model.path if model.path else ModelStore().path_for(model.name)
        return describe_model(model.name, path, model.format)
    except (EmberError, OSError) as err:
        log.warning("cannot describe %s: %s", model.name, err)
        return None


@router.get("/api/tags")
async def tags(request: Request):
    state = get_state(request)
    loaded = state.pool.list()
    names = {e.name for e in loaded}
    available = [m for m in await available_models(state) if m.name not in names]
    infos = await asyncio.to_thread(lambda: [_available_info(m) for m in available])
    return {"models": [_model_tag(e.name, e.info, e.created) for e in loaded]
            + [_model_tag(m.name, info, info.modified if info else m.modified)
               for m, info in zip(available, infos, strict=True)]}


@router.get("/api/ps")
async def ps(request: Request):
    models = []
    for entry in get_state(request).pool.list():
        expires = entry.expires_at
        models.append({**_model_tag(entry.name, entry.info, entry.created), "size": entry.size,
                       "size_vram": entry.size if entry.device != "cpu" else 0,
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


def _parameters_text(info: ModelInfo) -> str:
    """Ollama's `parameters`: one "name value" line per default the model ships (and ember applies)."""
    return "\n".join(f"{PARAMETER_NAMES[k]:<30} {v}" for k, v in info.defaults.items() if k in PARAMETER_NAMES)


def _model_info(info: ModelInfo, verbose: bool) -> dict:
    if info.format == "gguf":
        metadata = {**info.metadata, **(gguf_metadata_verbose(info.path) if verbose else {})}
        metadata["general.parameter_count"] = info.parameters
        return metadata
    family = info.family or "unknown"
    found = {"general.architecture": family, "general.parameter_count": info.parameters,
             f"{family}.context_length": info.context_length, f"{family}.embedding_length": info.embedding_length}
    return {k: v for k, v in found.items() if v is not None}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    name = _model_name(body)
    pool = get_state(request).pool
    key, resolved = await pool.lookup(name)
    entry = pool.loaded(key)
    info = entry.info if entry is not None else None
    if info is None and resolved is not None:
        try:
            info = await asyncio.to_thread(describe_model, key, resolved.path, resolved.format)
        except (EmberError, OSError) as err:
            raise APIError(500, f"cannot read {key}: {err}", code="unreadable_model") from None
    if info is None:
        raise APIError(404, f"{key} has no model files to describe", param="model", code="model_not_found")
    try:
        model_info = await asyncio.to_thread(_model_info, info, body.verbose)
    except (EmberError, OSError) as err:
        raise APIError(500, f"cannot read {key}: {err}", code="unreadable_model") from None
    result = {"modelfile": f"FROM {info.path}\n", "parameters": _parameters_text(info),
              "license": info.license or "", "template": info.template or "", "details": _details(info),
              "modified_at": _rfc3339(info.modified), "model_info": model_info,
              "capabilities": list(info.capabilities)}
    if info.load_seconds is not None:
        result["load_duration"] = _ns(info.load_seconds)
    return result


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
    if isinstance(err, ProtectedModel):
        return APIError(403, str(err), code="protected_model")
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
    events: asyncio.Queue = asyncio.Queue()
    failure: list[BaseException] = []  # what ended the pull, for the status of a non-streamed answer

    def report(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def work():
        from ember.store.pull import pull as pull_model

        return pull_model(ref, progress=False, report=report)

    async def items():
        yield {"status": "pulling manifest"}
        task = asyncio.ensure_future(asyncio.to_thread(work))
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            break
        try:
            manifest = task.result()
        except Exception as err:
            failure.append(err)
            yield {"error": str(err) if isinstance(err, EmberError) else f"pull failed: {err}"}
            return
        yield {"status": "success", "model": manifest.name, "total": manifest.size}

    if body.stream:
        return _ndjson(items())
    last: dict = {}
    async for item in items():
        last = item
    if failure:
        # ember's own errors name what the request got wrong (not a Hugging Face repo id, no such repo or
        # quantization): 400; anything else failed on the server's side. A stream reports either as Ollama
        # does, in its last line.
        raise APIError(400 if isinstance(failure[0], EmberError) else 500, last["error"], code="pull_failed")
    return last


@router.delete("/api/delete")
async def delete(body: DeleteRequest, request: Request):
    name = _model_name(body)
    from ember.store.store import ModelStore

    pool = get_state(request).pool
    try:
        refuse_reserved(name, "removed")  # before anything is unloaded
        if pool.serves(name):
            raise ProtectedModel(f"{name!r} is the model this server was started with: it cannot be removed "
                                 "while it is served")
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

    pool = get_state(request).pool
    try:
        if pool.serves(body.destination) or pool.loaded(body.destination) is not None:
            raise ProtectedModel(f"{body.destination!r} is a model this server has loaded: copying onto it would "
                                 "change what the name serves; choose another name")
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
    options = check_options(body.options, {"num_ctx"})
    entry = await state.use_model(request, body.model, body.keep_alive, num_ctx(options))
    started, load = time.monotonic(), request.scope.get(LOAD_SECONDS, 0.0)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if entry.engine.is_encoder:
        vectors, count = await encoder_embeddings(state, entry, texts, body.dimensions, body.truncate)
    else:
        if body.dimensions is not None:
            raise not_supported("dimensions with a chat model", param="dimensions")
        engine = entry.engine
        if body.truncate:
            limit = engine.max_model_len - 1
            inputs = await off_loop(request, lambda: [engine.tokenizer.encode(t)[:limit] for t in texts])
        else:
            inputs = await off_loop(request, lambda: [encode_prompt(engine, t, param="input") for t in texts])
        vectors = await embed_all(state, entry, inputs) if inputs else []
        count = sum(len(i) for i in inputs)
    return {"model": entry.name, "embeddings": [_normalized(v) for v in vectors],
            "total_duration": _ns(time.monotonic() - started + load), "load_duration": _ns(load),
            "prompt_eval_count": count}


@router.post("/api/embeddings")
async def embeddings(body: OllamaEmbeddingsRequest, request: Request):
    state = get_state(request)
    options = check_options(body.options, {"num_ctx"})
    entry = await state.use_model(request, body.model, body.keep_alive, num_ctx(options))
    if not body.prompt:
        return {"embedding": []}
    if entry.engine.is_encoder:
        return {"embedding": (await encoder_embeddings(state, entry, body.prompt, None))[0][0]}
    ids = await off_loop(request, lambda: encode_prompt(entry.engine, body.prompt))
    vector = (await embed_all(state, entry, [ids]))[0]
    return {"embedding": vector}


@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse)
async def root():
    return "ember is running"
