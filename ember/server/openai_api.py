"""OpenAI-compatible endpoints: chat completions, completions, models, embeddings and responses."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ember.engine.async_engine import AsyncEngine
from ember.engine.outputs import StepOutput, TokenLogprob
from ember.errors import EmberError
from ember.sampling_params import SamplingParams
from ember.server.chat_output import parse_whole
from ember.server.chat_plan import ChatPlan, plan_chat
from ember.server.constraints import compile_constraint, openai_constraint, responses_constraint
from ember.server.errors import APIError, bad_request, from_exception, not_supported
from ember.server.generation import Choice, Generation, collect, start_generation, validate
from ember.server.prompting import chat_prompt_ids, content_text, plain_messages, prompt_ids_list, token_text
from ember.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    SamplingFields,
)
from ember.server.state import ModelEntry, ServerState

router = APIRouter()
log = logging.getLogger("ember.server")

EMBEDDINGS_NOTE = ("mean-pooled final hidden states of a decoder model: usable for rough similarity, not a "
                   "trained embedding model")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def get_state(request: Request) -> ServerState:
    return request.app.state.ember


def sse(data: dict | str, event: str | None = None) -> str:
    # ASCII-escaped: a raw U+2028 or U+0085 in generated text ends the line for clients that split with
    # str.splitlines (httpx's iter_lines did, mid-event); escaped, every SSE reader sees one line.
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def sse_error(err: BaseException) -> str:
    api = from_exception(err)
    return sse({"error": {"message": api.message, "type": api.type, "param": api.param, "code": api.code}})


def streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def sampling_params(engine: AsyncEngine, body: SamplingFields, max_tokens: int | None,
                          logprobs: int | None, plan: ChatPlan | None = None) -> SamplingParams:
    """The body's SamplingParams, with its structured output constraint (or the tool calls `plan` requires)
    compiled (400 if it is invalid)."""
    kwargs = {name: getattr(body, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "logit_bias", "stop", "stop_token_ids") if getattr(body, name) is not None}
    structured, field = openai_constraint(body) or (None, None)
    params = SamplingParams(
        n=body.n, max_tokens=max_tokens, logprobs=logprobs, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
        structured=structured, **kwargs)
    if plan is not None:
        params, field = plan.constrain(params, field)
    await compile_constraint(engine, params, field)
    return params


def usage(generation: Generation, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in generation.prompts)
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(c.cached_tokens for c in choices if c.index % generation.params.n == 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# --- logprobs in OpenAI's two shapes ------------------------------------------------------------------------
def chat_logprobs(engine: AsyncEngine, logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(engine, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(engine: AsyncEngine, logprobs: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    if logprobs is None:
        return None
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(token_text(engine, lp.token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(engine, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


# --- models -------------------------------------------------------------------------------------------------
def model_card(entry: ModelEntry) -> dict:
    engine = entry.engine
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "ember",
            "max_model_len": engine.max_model_len,
            "meta": {"max_model_len": engine.max_model_len, "chat_template": engine.chat_template is not None,
                     "embeddings": EMBEDDINGS_NOTE}}


def available_card(model) -> dict:
    """A model that is available (ember.store.catalog) but not loaded."""
    return {"id": model.name, "object": "model", "created": int(model.modified), "owned_by": "ember",
            "meta": {"loaded": False, "format": model.format, "size": model.size, "source": model.source}}


async def available_models(state: ServerState) -> list:
    """What the server can run without downloading: ember.store.catalog's list (store + discovered)."""
    from ember.store.catalog import list_models as catalog_models

    def listing() -> list:
        found = catalog_models(True)
        names = {m.name for m in found}
        return found + [_registered_entry(r) for r in state.pool.registered() if r.name not in names]

    try:
        return await asyncio.to_thread(listing)
    except Exception as err:  # an unreadable store still lists the loaded models
        log.warning("cannot list the available models: %s", err)
        return []


def _registered_entry(resolved):
    """A catalog entry for the `ember serve` model (a path the catalog does not list)."""
    from types import SimpleNamespace

    from ember.store.info import describe_path

    path = resolved.path
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    try:
        details = describe_path(path)
    except Exception:  # still listed
        details = {}
    return SimpleNamespace(name=resolved.name, size=sum(p.stat().st_size for p in files), format=resolved.format,
                           quant=details.get("quant"), parameters=details.get("parameters"),
                           modified=max((p.stat().st_mtime for p in files), default=0.0), source=resolved.source,
                           path=str(path), architecture=details.get("architecture"))


@router.get("/v1/models")
async def list_models(request: Request):
    state = get_state(request)
    loaded = state.pool.list()
    names = {e.name for e in loaded}
    cards = [model_card(e) for e in loaded]
    cards += [available_card(m) for m in await available_models(state) if m.name not in names]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = get_state(request)
    entry = state.pool.loaded(model_id)
    if entry is not None:
        return model_card(entry)
    name, _ = await state.pool.lookup(model_id)  # 400/404 for malformed or unknown names
    entry = state.pool.loaded(name)
    if entry is not None:
        return model_card(entry)
    for model in await available_models(state):
        if model.name == name:
            return available_card(model)
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "ember", "meta": {"loaded": False}}


# --- chat completions ---------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs: requires logprobs to be true", param="top_logprobs")
    entry = await state.use_model(request, body.model)
    plan = plan_chat(entry.engine, plain_messages(body.messages), body.tools, body.tool_choice,
                     body.parallel_tool_calls, body.chat_template_kwargs, body.add_generation_prompt)
    params = await sampling_params(entry.engine, body, body.max_completion_tokens or body.max_tokens,
                                   (body.top_logprobs or 0) if body.logprobs else None, plan)
    generation = start_generation(state, entry, [plan.prompt], params, "chatcmpl")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.name,
            "system_fingerprint": None}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(_chat_stream(generation, head, include_usage, plan))
    choices = await collect(request, generation)
    return {**head, "object": "chat.completion", "choices": [
        {"index": c.index, **_chat_message(plan, c), "logprobs": chat_logprobs(entry.engine, c.logprobs)}
        for c in choices], "usage": usage(generation, choices)}


def _chat_message(plan: ChatPlan, choice: Choice) -> dict:
    """A finished choice's message (content, reasoning_content, tool_calls) and finish_reason."""
    parsed = parse_whole(plan.parser(), choice.text)
    message: dict = {"role": "assistant", "content": parsed.content or (None if parsed.calls else "")}
    if plan.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning or None
    if parsed.calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in parsed.calls]
    return {"message": message, "finish_reason": _finish_reason(choice.finish_reason, bool(parsed.calls))}


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def _chat_deltas(events: list[tuple]) -> list[dict]:
    """Parser events as OpenAI chat deltas: content, reasoning_content, or one tool call's start / arguments."""
    deltas: list[dict] = []
    for event in events:
        kind = event[0]
        if kind in ("content", "reasoning"):
            key = "content" if kind == "content" else "reasoning_content"
            if deltas and set(deltas[-1]) == {key}:
                deltas[-1][key] += event[1]
            else:
                deltas.append({key: event[1]})
        elif kind == "call":
            deltas.append({"tool_calls": [{"index": event[1], "id": event[2], "type": "function",
                                           "function": {"name": event[3], "arguments": ""}}]})
        elif kind == "args":
            deltas.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
    return deltas


async def _sse_stream(generation: Generation, head: dict, include_usage: bool, render) -> AsyncIterator[str]:
    """The SSE body of a generation: `render(index, out, first)` yields each output's chunks, then come the usage
    chunk (when asked for) and [DONE]; an error mid-stream becomes an error event and [DONE]."""
    choices = [Choice(i) for i in range(generation.num_choices)]
    started: set[int] = set()
    try:
        async with aclosing(generation.stream()) as stream:
            async for index, out in stream:
                choices[index].add(out)
                first = index not in started
                started.add(index)
                for event in render(index, out, first):
                    yield event
    except (EmberError, APIError) as err:
        yield sse_error(err)
        yield sse("[DONE]")
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(generation, choices)})
    yield sse("[DONE]")


def _chat_stream(generation: Generation, head: dict, include_usage: bool, plan: ChatPlan) -> AsyncIterator[str]:
    engine = generation.engine
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    parsers = [plan.parser() for _ in range(generation.num_choices)]
    called = [False] * generation.num_choices

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}], **extra})

    def render(index: int, out: StepOutput, first: bool):
        if first:
            yield chunk(index, {"role": "assistant", "content": ""})
        parser = parsers[index]
        events = parser.feed(out.text_delta) + (parser.finish() if out.finished else [])
        called[index] = called[index] or any(e[0] == "call" for e in events)
        logprobs = chat_logprobs(engine, out.logprobs)
        deltas = _chat_deltas(events) or ([{"content": ""}] if out.logprobs else [])
        for delta in deltas:
            yield chunk(index, delta, logprobs)
            logprobs = None
        if out.finished:
            yield chunk(index, {}, None, _finish_reason(out.finish_reason, called[index]))

    return _sse_stream(generation, head, include_usage, render)


# --- completions --------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    if body.suffix:
        raise not_supported("suffix (fill-in-the-middle)", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise not_supported("best_of different from n", param="best_of")
    entry = await state.use_model(request, body.model)
    prompts = prompt_ids_list(entry.engine, body.prompt)
    params = await sampling_params(entry.engine, body, 16 if body.max_tokens is None else body.max_tokens,
                                   body.logprobs)
    generation = start_generation(state, entry, prompts, params, "cmpl")
    echoes = [entry.engine.tokenizer.decode(p) if body.echo else "" for p in prompts]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.name,
            "system_fingerprint": None}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(_completion_stream(generation, head, include_usage, echoes))
    choices = await collect(request, generation)
    result = []
    for c in choices:
        echo = echoes[generation.prompt_of(c.index)]
        result.append({"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
                       "logprobs": completion_logprobs(entry.engine, c.logprobs, len(echo))})
    return {**head, "object": "text_completion", "choices": result, "usage": usage(generation, choices)}


def _completion_stream(generation: Generation, head: dict, include_usage: bool,
                       echoes: list[str]) -> AsyncIterator[str]:
    engine = generation.engine
    head = {**head, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    offsets = [len(echoes[generation.prompt_of(i)]) for i in range(generation.num_choices)]

    def render(index: int, out: StepOutput, first: bool):
        echo = echoes[generation.prompt_of(index)] if first else ""
        if echo or out.text_delta or out.logprobs or out.finished:
            logprobs = completion_logprobs(engine, out.logprobs, offsets[index])
            offsets[index] += len(out.text_delta)
            yield sse({**head, "choices": [{"index": index, "text": echo + out.text_delta, "logprobs": logprobs,
                                            "finish_reason": out.finish_reason}], **extra})

    return _sse_stream(generation, head, include_usage, render)


# --- embeddings ---------------------------------------------------------------------------------------------
async def embed_all(state: ServerState, entry: ModelEntry, inputs: list[list[int]]) -> list[list[float]]:
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    probe = SamplingParams(max_tokens=1)
    for ids in inputs:
        validate(entry.engine, ids, probe)
    return [await entry.engine.embed(ids) for ids in inputs]


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = get_state(request)
    entry = await state.use_model(request, body.model)
    if body.dimensions is not None:
        raise not_supported("dimensions (shortened embeddings)", param="dimensions")
    inputs = prompt_ids_list(entry.engine, body.input, "input")
    vectors = await embed_all(state, entry, inputs)
    data = []
    for index, vector in enumerate(vectors):
        value = (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                 if body.encoding_format == "base64" else vector)
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = sum(len(ids) for ids in inputs)
    return {"object": "list", "data": data, "model": entry.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- responses ----------------------------------------------------------------------------------------------
def _responses_messages(body: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for item in body.input:
        kind = item.get("type", "message")
        if kind != "message" or not isinstance(item.get("role"), str):
            raise not_supported(f"input items of type {kind!r}", param="input")
        content = item.get("content")
        if not isinstance(content, (str, list)) or (isinstance(content, list)
                                                    and not all(isinstance(p, dict) for p in content)):
            raise bad_request("input: a message's content must be a string or a list of content parts",
                              param="input")
        messages.append({"role": item["role"], "content": content_text(content, "input")})
    return messages


def _response_object(rid: str, created: int, body: ResponsesRequest, model: str, status: str,
                     choice: Choice | None, msg_id: str) -> dict:
    output = []
    if choice is not None:
        output = [{"type": "message", "id": msg_id, "status": "completed" if status == "completed" else status,
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": choice.text, "annotations": [], "logprobs": []}]}]
    usage_block = None
    if choice is not None:
        usage_block = {"input_tokens": choice.prompt_tokens, "output_tokens": choice.completion_tokens,
                       "total_tokens": choice.prompt_tokens + choice.completion_tokens,
                       "input_tokens_details": {"cached_tokens": choice.cached_tokens},
                       "output_tokens_details": {"reasoning_tokens": 0}}
    incomplete = None
    if status == "incomplete" and choice is not None:
        incomplete = {"reason": "max_output_tokens" if choice.finish_reason == "length" else "aborted"}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": model, "output": output,
            "parallel_tool_calls": False, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False, "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": ((body.text or {}).get("format") or {"type": "text"})}, "tool_choice": "auto", "tools": [],
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled",
            "usage": usage_block, "user": body.user, "metadata": body.metadata or {}}


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request):
    state = get_state(request)
    if (body.model_extra or {}).get("tools"):
        raise not_supported("tools on /v1/responses (use /v1/chat/completions)", param="tools")
    structured, field = responses_constraint(body.text) or (None, None)
    entry = await state.use_model(request, body.model)
    prompt = chat_prompt_ids(entry.engine, _responses_messages(body))
    kwargs = {k: getattr(body, k) for k in ("temperature", "top_p", "seed") if getattr(body, k) is not None}
    params = SamplingParams(max_tokens=body.max_output_tokens, structured=structured, **kwargs)
    await compile_constraint(entry.engine, params, field)
    generation = start_generation(state, entry, [prompt], params, "resp")
    rid, msg_id, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return streaming(_responses_stream(generation, body, rid, msg_id, created))
    choice = (await collect(request, generation))[0]
    status = "completed" if choice.finish_reason == "stop" else "incomplete"
    return _response_object(rid, created, body, entry.name, status, choice, msg_id)


async def _responses_stream(generation: Generation, body: ResponsesRequest, rid: str, msg_id: str,
                            created: int) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        sequence += 1
        return sse({"type": kind, "sequence_number": sequence - 1, **fields}, event=kind)

    model = generation.model
    yield event("response.created",
                response=_response_object(rid, created, body, model, "in_progress", None, msg_id))
    yield event("response.in_progress",
                response=_response_object(rid, created, body, model, "in_progress", None, msg_id))
    item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part)
    choice = Choice(0)
    try:
        async with aclosing(generation.stream()) as stream:
            async for _, out in stream:
                choice.add(out)
                if out.text_delta:
                    yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                                delta=out.text_delta, logprobs=[])
    except (EmberError, APIError) as err:
        api = from_exception(err)
        yield event("error", code=api.code, message=api.message, param=api.param)
        return
    yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=choice.text,
                logprobs=[])
    yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0,
                part={**part, "text": choice.text})
    status = "completed" if choice.finish_reason == "stop" else "incomplete"
    final = _response_object(rid, created, body, model, status, choice, msg_id)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
