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
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ember.engine.async_engine import AsyncEngine
from ember.engine.outputs import StepOutput, TokenLogprob
from ember.sampling_params import SamplingParams
from ember.server.chat_output import parse_whole
from ember.server.chat_plan import ChatPlan, plan_chat
from ember.server.constraints import openai_constraint, responses_constraint, with_constraint
from ember.server.errors import APIError, bad_request, from_exception, not_supported
from ember.server.generation import Choice, Generation, collect, drive, start_generation, validate
from ember.server.lora_api import lora_cards
from ember.server.offload import off_loop
from ember.server.prompting import (
    fim_prompt_ids,
    plain_messages,
    prompt_ids_list,
    token_text,
)
from ember.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    SamplingFields,
    StreamOptions,
)
from ember.server.reasoning import THINK_CLOSE
from ember.server.responses_items import OutputItems, chat_tools, input_messages
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


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    kwargs = {name: getattr(body, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "logit_bias", "stop", "stop_token_ids") if getattr(body, name) is not None}
    return SamplingParams(
        n=body.n, max_tokens=max_tokens, logprobs=logprobs, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
        speculative=body.speculative, use_prefix_cache=body.cache_prompt, **kwargs)


async def request_params(engine: AsyncEngine, body: SamplingFields, max_tokens: int | None,
                         logprobs: int | None, plan: ChatPlan | None = None) -> SamplingParams:
    """The body's SamplingParams with its structured output constraint (or the tool calls `plan` requires)
    compiled (400 if it is invalid)."""
    params, constraint = sampling_params(body, max_tokens, logprobs), openai_constraint(body)
    if plan is not None:
        params, constraint = plan.sampling(params), plan.constrain(constraint)
    return await with_constraint(engine, params, constraint)


def usage(generation: Generation, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in generation.prompts)
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(c.cached_tokens for c in choices if c.index % generation.params.n == 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# --- logprobs in OpenAI's two shapes ------------------------------------------------------------------------
def token_entry(engine: AsyncEngine, token_id: int, logprob: float) -> dict:
    """One token's text, log-probability and UTF-8 bytes (OpenAI's chat shape; llama.cpp adds the id)."""
    text = token_text(engine, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(engine: AsyncEngine, logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None
    return {"content": [{**token_entry(engine, lp.token_id, lp.logprob),
                         "top_logprobs": [token_entry(engine, t, v) for t, v in lp.top]} for lp in logprobs]}


def completion_logprobs(engine: AsyncEngine, logprobs: list[TokenLogprob] | None, offset: int = 0,
                        echoed: tuple[list[int], list[TokenLogprob | None]] | None = None) -> dict | None:
    """OpenAI's legacy shape. `echoed`: the prompt's ids and log-probabilities, listed first; its first token has
    none (null, as OpenAI answers)."""
    if logprobs is None and echoed is None:
        return None
    entries = list(zip(*echoed, strict=True)) if echoed else []
    entries += [(lp.token_id, lp) for lp in logprobs or []]
    tokens, offsets = [], []
    for token_id, _ in entries:
        offsets.append(offset)
        tokens.append(token_text(engine, token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
            "top_logprobs": [{token_text(engine, t): v for t, v in lp.top} if lp else None for _, lp in entries],
            "text_offset": offsets}


def finish_reason(reason: str | None) -> str | None:
    """Only the reasons OpenAI's clients know. An aborted choice (the server shutting down, past its grace
    period) reads "length": its text was cut short, which "stop" would deny."""
    return "length" if reason == "abort" else reason


def check_stream_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed when stream is true", param="stream_options")


# --- models -------------------------------------------------------------------------------------------------
def model_card(entry: ModelEntry) -> dict:
    engine = entry.engine
    note = EMBEDDINGS_NOTE
    if engine.is_encoder:
        config = engine.engine.config
        note = ("a reranking (cross-encoder) model: /v1/rerank and /v1/score" if config.is_cross_encoder else
                f"an embedding model: {config.pooling} pooling{', L2-normalised' if config.normalize else ''}")
    meta = {"max_model_len": engine.max_model_len, "chat_template": engine.chat_template is not None,
            "embeddings": note, "loaded": True, **_info_meta(entry.info)}
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "ember",
            "max_model_len": engine.max_model_len, "meta": meta}


def available_card(model) -> dict:
    """A model that is available (ember.store.catalog) but not loaded."""
    return {"id": model.name, "object": "model", "created": int(model.modified), "owned_by": "ember",
            "meta": {"loaded": False, "format": model.format, "size": model.size, "source": model.source,
                     **({"quantization": model.quant} if model.quant else {}),
                     **({"parameters": model.parameters} if model.parameters else {})}}


def _info_meta(info) -> dict:
    """What ember.store.model_info knows of a loaded model, for its card (nothing when it has no files)."""
    if info is None:
        return {}
    found = {"format": info.format, "family": info.family, "parameters": info.parameters,
             "quantization": info.quantization, "digest": f"sha256:{info.digest}", "size": info.size,
             "context_length": info.context_length, "capabilities": list(info.capabilities),
             "load_seconds": info.load_seconds}
    return {k: v for k, v in found.items() if v is not None}


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
    cards = [model_card(e) for e in loaded] + lora_cards(state)
    # The model `ember serve` was started with comes first while it still loads: clients (`ember bench serve`
    # among them) take the first listed model when told none
    available = sorted(await available_models(state), key=lambda m: not state.pool.serves(m.name))
    cards += [available_card(m) for m in available if m.name not in names | set(state.pool.lora)]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = get_state(request)
    entry = state.pool.loaded(model_id)
    if entry is not None:
        return model_card(entry)
    for card in lora_cards(state):
        if card["id"] == model_id:
            return card
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
    plan = await off_loop(request, lambda: plan_chat(
        entry.engine, plain_messages(body.messages), body.tools, body.tool_choice, body.parallel_tool_calls,
        body.chat_template_kwargs, body.add_generation_prompt))
    check_stream_options(body)
    params = await request_params(entry.engine, body, body.max_completion_tokens or body.max_tokens,
                                  (body.top_logprobs or 0) if body.logprobs else None, plan)
    generation = start_generation(request, entry, [plan.prompt], params, "chatcmpl")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.name,
            "system_fingerprint": None}
    if body.stream:
        return streaming(_chat_stream(generation, head, body.stream_options, plan))
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
    return "tool_calls" if called and reason == "stop" else finish_reason(reason)


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


def _sse_stream(generation: Generation, head: dict, options: StreamOptions | None, render) -> AsyncIterator[str]:
    """The SSE body of a generation: `render(index, out, first, extra)` yields each output's chunks, each with
    `extra` spliced in (the usage field stream_options asks for), then come the usage chunk (include_usage) and
    [DONE]; an error mid-stream becomes an error event and [DONE]."""
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    started: set[int] = set()

    def each(index: int, out: StepOutput, choices: list[Choice]):
        first = index not in started
        started.add(index)
        extra = {"usage": usage(generation, choices)} if continuous else {"usage": None} if include_usage else {}
        return render(index, out, first, extra)

    def done(choices: list[Choice]) -> list[str]:
        tail = [sse({**head, "choices": [], "usage": usage(generation, choices)})] if include_usage else []
        return [*tail, sse("[DONE]")]

    return drive(generation, each, lambda err: [sse_error(err), sse("[DONE]")], done)


def _chat_stream(generation: Generation, head: dict, options: StreamOptions | None,
                 plan: ChatPlan) -> AsyncIterator[str]:
    engine = generation.engine
    head = {**head, "object": "chat.completion.chunk"}
    parsers = [plan.parser() for _ in range(generation.num_choices)]
    called = [False] * generation.num_choices

    def render(index: int, out: StepOutput, first: bool, extra: dict):
        def chunk(delta: dict, logprobs=None, reason=None) -> str:
            return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": reason}], **extra})

        if first:
            yield chunk({"role": "assistant", "content": ""})
        parser = parsers[index]
        events = parser.feed(out.text_delta) + (parser.finish() if out.finished else [])
        called[index] = called[index] or any(e[0] == "call" for e in events)
        logprobs = chat_logprobs(engine, out.logprobs)
        deltas = _chat_deltas(events) or ([{"content": ""}] if out.logprobs else [])
        for delta in deltas:
            yield chunk(delta, logprobs)
            logprobs = None
        if out.finished:
            yield chunk({}, None, _finish_reason(out.finish_reason, called[index]))

    return _sse_stream(generation, head, options, render)


# --- completions --------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    check_stream_options(body)
    if body.best_of is not None and body.best_of != body.n:
        raise not_supported("best_of different from n", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens: 0 is only accepted with echo (to score the prompt)", param="max_tokens")
    entry = await state.use_model(request, body.model)
    prompts = await off_loop(request, lambda: _completion_prompts(entry.engine, body))
    params = await request_params(entry.engine, body, 16 if body.max_tokens is None else body.max_tokens,
                                  body.logprobs)
    if body.echo and body.logprobs is not None:
        # What lm-evaluation-harness scores: the prompt's own tokens, each given those before it.
        params = replace(params, prompt_logprobs=body.logprobs)
    generation = start_generation(request, entry, prompts, params, "cmpl")
    echoes = await off_loop(request, lambda: [entry.engine.tokenizer.decode(p) if body.echo else "" for p in prompts])
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.name,
            "system_fingerprint": None}
    if body.stream:
        return streaming(_completion_stream(generation, head, body.stream_options, echoes))
    choices = await collect(request, generation)
    result = []
    for c in choices:
        echo = echoes[generation.prompt_of(c.index)]
        if c.prompt_logprobs is None:
            logprobs = completion_logprobs(entry.engine, c.logprobs, len(echo))
        else:  # the prompt's tokens listed too, from offset 0
            echoed = (generation.prompts[generation.prompt_of(c.index)], c.prompt_logprobs)
            logprobs = completion_logprobs(entry.engine, c.logprobs, 0, echoed)
        result.append({"index": c.index, "text": echo + c.text, "finish_reason": finish_reason(c.finish_reason),
                       "logprobs": logprobs})
    return {**head, "object": "text_completion", "choices": result, "usage": usage(generation, choices)}


def _completion_prompts(engine: AsyncEngine, body: CompletionRequest) -> list[list[int]]:
    """The prompts' ids; with a suffix, each text prompt is the prefix of a fill-in-the-middle prompt."""
    if body.suffix is None:
        return prompt_ids_list(engine, body.prompt)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not all(isinstance(text, str) for text in texts):
        raise bad_request("suffix: needs text prompts, not token ids", param="suffix")
    return [fim_prompt_ids(engine, text, body.suffix) for text in texts]


def _completion_stream(generation: Generation, head: dict, options: StreamOptions | None,
                       echoes: list[str]) -> AsyncIterator[str]:
    engine = generation.engine
    head = {**head, "object": "text_completion"}
    offsets = [len(echoes[generation.prompt_of(i)]) for i in range(generation.num_choices)]

    def render(index: int, out: StepOutput, first: bool, extra: dict):
        echo = echoes[generation.prompt_of(index)] if first else ""
        echoed = None
        if out.prompt_logprobs is not None:  # the first output: the prompt's tokens are listed from offset 0
            echoed = (generation.prompts[generation.prompt_of(index)], out.prompt_logprobs)
            offsets[index] = 0
        if echo or out.text_delta or out.logprobs or out.finished or echoed:
            logprobs = completion_logprobs(engine, out.logprobs, offsets[index], echoed)
            offsets[index] += sum(map(len, logprobs["tokens"])) if echoed else len(out.text_delta)
            yield sse({**head, "choices": [{"index": index, "text": echo + out.text_delta, "logprobs": logprobs,
                                            "finish_reason": finish_reason(out.finish_reason)}], **extra})

    return _sse_stream(generation, head, options, render)


# --- embeddings ---------------------------------------------------------------------------------------------
async def embed_all(state: ServerState, entry: ModelEntry, inputs: list[list[int]]) -> list[list[float]]:
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if entry.lora is not None:
        raise bad_request(f"model: {entry.name} is a LoRA adapter: embeddings come from its base model "
                          f"{entry.engine.model_name}", param="model")
    probe = SamplingParams(max_tokens=1)
    for ids in inputs:
        validate(entry.engine, ids, probe)
    return [await entry.engine.embed(ids) for ids in inputs]


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = get_state(request)
    entry = await state.use_model(request, body.model)
    if entry.engine.is_encoder:
        vectors, tokens = await encoder_embeddings(state, entry, body.input, body.dimensions)
    else:
        if body.dimensions is not None:
            raise not_supported("dimensions (shortened embeddings) with a chat model", param="dimensions")
        inputs = await off_loop(request, lambda: prompt_ids_list(entry.engine, body.input, "input"))
        vectors = await embed_all(state, entry, inputs)
        tokens = sum(len(ids) for ids in inputs)
    data = []
    for index, vector in enumerate(vectors):
        value = (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                 if body.encoding_format == "base64" else vector)
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": entry.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def encoder_embeddings(state: ServerState, entry: ModelEntry, inputs, dimensions: int | None,
                             truncate: bool = True) -> tuple[list[list[float]], int]:
    """An embedding model's vectors for texts (tokenized and truncated as sentence-transformers does) or
    token-id lists (taken whole), and the tokens it read."""
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        return [], 0
    if isinstance(inputs[0], str):
        result = await entry.engine.embed_batched(lambda e: e.text_inputs(inputs, truncate), dimensions)
    else:
        id_lists = [inputs] if isinstance(inputs[0], int) else inputs
        result = await entry.engine.embed_batched(lambda e: e.token_id_inputs(id_lists), dimensions)
    return result.values, result.prompt_tokens


# --- responses ---------------------------------------------------------------------------------------------
def _conversation(state: ServerState, body: ResponsesRequest) -> list[dict]:
    """The messages so far: those of `previous_response_id` (its instructions are not carried over, as in
    OpenAI's API; its function calls are), then this request's input."""
    messages: list[dict] = []
    if body.previous_response_id is not None:
        previous = state.responses.get(body.previous_response_id)
        if previous is None:
            raise bad_request(f"previous_response_id: no stored response {body.previous_response_id!r} (this "
                              "server keeps the most recent ones with store true, until it restarts)",
                              param="previous_response_id")
        messages = list(previous)
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    return messages + input_messages(body.input)


def _reasoning_tokens(engine: AsyncEngine, choice: Choice, output: list[dict]) -> int:
    """Generated tokens up to the one that closes the reasoning (all of them if it never closed); 0 without a
    reasoning item. Whether a prefix's text holds </think> only grows with the prefix: a binary search."""
    if not any(item["type"] == "reasoning" for item in output):
        return 0
    ids, low, high = choice.token_ids, 1, len(choice.token_ids)
    while low < high:
        mid = (low + high) // 2
        if THINK_CLOSE in engine.tokenizer.decode(ids[:mid], skip_special_tokens=False):
            high = mid
        else:
            low = mid + 1
    return high


def _response_object(rid: str, created: int, body: ResponsesRequest, model: str, status: str,
                     choice: Choice | None = None, output: list[dict] | None = None, reasoning_tokens: int = 0
                     ) -> dict:
    usage_block = None
    if choice is not None:
        usage_block = {"input_tokens": choice.prompt_tokens, "output_tokens": choice.completion_tokens,
                       "total_tokens": choice.prompt_tokens + choice.completion_tokens,
                       "input_tokens_details": {"cached_tokens": choice.cached_tokens},
                       "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}
    incomplete = None
    if status == "incomplete" and choice is not None:
        incomplete = {"reason": "max_output_tokens" if choice.finish_reason == "length" else "aborted"}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": model, "output": output or [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store is not False, "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tool_choice": body.tool_choice or ("auto" if body.tools else "none"), "tools": body.tools or [],
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled",
            "usage": usage_block, "user": body.user, "metadata": body.metadata or {}}


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request):
    state = get_state(request)
    constraint = responses_constraint(body.text)
    tools = chat_tools(body.tools)
    conversation = _conversation(state, body)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    entry = await state.use_model(request, body.model)
    plan = await off_loop(request, lambda: plan_chat(entry.engine, instructions + conversation, tools,
                                                     body.tool_choice, body.parallel_tool_calls))
    kwargs = {k: getattr(body, k) for k in ("temperature", "top_p", "seed") if getattr(body, k) is not None}
    params = plan.sampling(SamplingParams(max_tokens=body.max_output_tokens, **kwargs))
    params = await with_constraint(entry.engine, params, plan.constrain(constraint))
    generation = start_generation(request, entry, [plan.prompt], params, "resp")
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())

    def finish(choice: Choice, items: OutputItems) -> tuple[str, list]:
        """The response's status and the last events; the answer is kept for previous_response_id."""
        status = "completed" if choice.finish_reason == "stop" else "incomplete"
        events = items.finish(status)
        if body.store is not False:
            state.responses.put(rid, [*conversation, items.message()])
        return status, events

    if body.stream:
        return streaming(_responses_stream(generation, body, rid, created, OutputItems(plan.parser()), finish))
    choice = (await collect(request, generation))[0]
    items = OutputItems(plan.parser())
    items.feed(choice.text)
    status, _ = finish(choice, items)
    return _response_object(rid, created, body, entry.name, status, choice, items.items,
                            _reasoning_tokens(entry.engine, choice, items.items))


async def _responses_stream(generation: Generation, body: ResponsesRequest, rid: str, created: int,
                            items: OutputItems, finish) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        sequence += 1
        return sse({"type": kind, "sequence_number": sequence - 1, **fields}, event=kind)

    model = generation.model
    yield event("response.created", response=_response_object(rid, created, body, model, "in_progress"))
    yield event("response.in_progress", response=_response_object(rid, created, body, model, "in_progress"))

    def each(_: int, out: StepOutput, __):
        for kind, fields in items.feed(out.text_delta):
            yield event(kind, **fields)

    def done(choices: list[Choice]):
        choice = choices[0]
        status, events = finish(choice, items)
        for kind, fields in events:
            yield event(kind, **fields)
        final = _response_object(rid, created, body, model, status, choice, items.items,
                                 _reasoning_tokens(generation.engine, choice, items.items))
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)

    def failed(api: APIError):
        yield event("error", code=api.code, message=api.message, param=api.param)

    async for item in drive(generation, each, failed, done):
        yield item
