"""llama.cpp-server-style endpoints: completion (its own fields and stream), props, slots, health, tokenize,
detokenize, apply-template and Prometheus metrics."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ember import __version__
from ember.engine.async_engine import AsyncEngine
from ember.engine.outputs import StepOutput, TokenLogprob
from ember.sampling_params import LOGIT_BIAS_LIMIT, SamplingParams
from ember.server.constraints import llamacpp_constraint, with_constraint
from ember.server.errors import APIError, bad_request, not_supported
from ember.server.generation import Choice, Generation, collect, drive, start_generation
from ember.server.metrics import CONTENT_TYPE
from ember.server.offload import off_loop
from ember.server.openai_api import sse, streaming, token_entry
from ember.server.prompting import encode_prompt, plain_messages, render_chat
from ember.server.protocol import (
    ApplyTemplateRequest,
    DetokenizeRequest,
    LlamaCompletionRequest,
    TokenizeRequest,
)
from ember.server.state import ServerState

router = APIRouter()


def get_state(request: Request) -> ServerState:
    return request.app.state.ember


async def _engine(request: Request, body):
    """The engine of the request's "model" (an extension; llama.cpp serves one model), else the default one."""
    model = getattr(body, "model", None)
    entry = await get_state(request).use_model(request, model if isinstance(model, str) else None)
    return entry.engine


@router.get("/health")
async def health(request: Request):
    state = get_state(request)
    if state.pool.ready and not state.shutting_down:
        return {"status": "ok"}
    message = "Shutting down" if state.shutting_down else "Loading model"
    return JSONResponse({"status": "loading" if not state.shutting_down else "shutting_down",
                         "error": {"code": 503, "message": message, "type": "unavailable_error"}},
                        status_code=503, headers={"Retry-After": "1"})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    tokenizer = (await _engine(request, body)).tokenizer

    def tokens() -> Response:
        ids = tokenizer.encode(body.content, add_special_tokens=body.add_special)
        if body.with_pieces:
            ids = [{"id": i, "piece": tokenizer.decode([i], skip_special_tokens=False)} for i in ids]
        # Encoded here, not by FastAPI on the event loop (its encoder walks a list of a million ids for seconds).
        return Response(json.dumps({"tokens": ids}), media_type="application/json")

    return await off_loop(request, tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    engine = await _engine(request, body)
    vocab = engine.tokenizer.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise bad_request(f"tokens: id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"content": await off_loop(request, lambda: engine.tokenizer.decode(body.tokens,
                                                                               skip_special_tokens=False))}


@router.post("/apply-template")
async def apply_template(body: ApplyTemplateRequest, request: Request):
    engine = await _engine(request, body)
    return {"prompt": await off_loop(request, lambda: render_chat(engine, plain_messages(body.messages), body.tools,
                                                                 template_kwargs=body.chat_template_kwargs))}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


# --- /completion --------------------------------------------------------------------------------------------
def _prompt_ids(engine: AsyncEngine, prompt: str | list) -> list[int]:
    """A string, token ids, or token ids mixed with strings; a BOS is added when the prompt starts with text."""
    if isinstance(prompt, str):
        return encode_prompt(engine, prompt)
    if len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise not_supported("several prompts in one request", param="prompt")
    ids: list[int] = []
    for index, piece in enumerate(prompt):
        ids += encode_prompt(engine, piece, add_special_tokens=index == 0) if isinstance(piece, str) else [piece]
    return ids


def _logit_bias(engine: AsyncEngine, value: list | dict | None) -> dict[int, float]:
    """llama.cpp's [[token, bias], ...] or {"token": bias}: a token is an id or text (each of its tokens is
    biased); a bias of false bans the token (the most negative bias ember takes)."""
    if value is None:
        return {}
    pairs = list(value.items()) if isinstance(value, dict) else value
    bias: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise bad_request("logit_bias: each entry must be a [token, bias] pair", param="logit_bias")
        token, amount = pair
        if amount is False:
            amount = -LOGIT_BIAS_LIMIT
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise bad_request(f"logit_bias: a bias must be a number or false, got {amount!r}", param="logit_bias")
        if isinstance(token, str) and token.isascii() and token.isdigit():
            token = int(token)
        if isinstance(token, str):
            ids = engine.tokenizer.encode(token, add_special_tokens=False)
        elif isinstance(token, int) and not isinstance(token, bool):
            ids = [token]
        else:
            raise bad_request(f"logit_bias: a token must be an id or a string, got {token!r}", param="logit_bias")
        bias.update(dict.fromkeys(ids, float(amount)))
    return bias


def _params(engine: AsyncEngine, body: LlamaCompletionRequest) -> SamplingParams:
    # The repetition penalty looks at the last repeat_last_n tokens; 0 turns every penalty off, as in llama.cpp.
    # (ember's presence/frequency penalties count the generated tokens, OpenAI's way, whatever the window.)
    penalties = dict(repetition_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
                     frequency_penalty=body.frequency_penalty,
                     repetition_window=None if body.repeat_last_n == -1 else body.repeat_last_n)
    if body.repeat_last_n == 0:
        penalties = {}
    return SamplingParams(
        max_tokens=None if body.n_predict == -1 else body.n_predict, temperature=max(body.temperature, 0.0),
        top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, seed=None if body.seed == -1 else body.seed,
        stop=body.stop, ignore_eos=body.ignore_eos, logprobs=body.n_probs or None,
        logit_bias=_logit_bias(engine, body.logit_bias), use_prefix_cache=body.cache_prompt, **penalties)


def settings_json(params: SamplingParams, n_ctx: int) -> dict:
    """A request's settings under llama.cpp's names (its `generation_settings` / slot `params`)."""
    n_predict = -1 if params.max_tokens is None else params.max_tokens
    return {"n_ctx": n_ctx, "n_predict": n_predict, "max_tokens": n_predict,
            "seed": -1 if params.seed is None else params.seed, "temperature": params.temperature,
            "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
            "repeat_penalty": params.repetition_penalty,
            "repeat_last_n": -1 if params.repetition_window is None else params.repetition_window,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
            "stop": params.stop, "ignore_eos": params.ignore_eos, "n_probs": params.logprobs or 0,
            "logit_bias": [[token, bias] for token, bias in params.logit_bias.items()],
            "cache_prompt": params.use_prefix_cache}


def _probs(engine: AsyncEngine, logprobs: list[TokenLogprob] | None) -> list[dict]:
    """llama.cpp's completion_probabilities: each token with its id, and its alternatives likewise."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"id": token_id, **token_entry(engine, token_id, logprob)}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs or []]


def timings(choice: Choice, started: float, ended: float) -> dict:
    """Measured as llama.cpp reports them: the prompt from the request's start to its first token, generation
    from the first token to the last; rates only where some time passed."""
    first = choice.first_token_at or ended
    result = {"cache_n": choice.cached_tokens, "prompt_n": choice.prompt_tokens - choice.cached_tokens,
              "prompt_ms": (first - started) * 1e3, "predicted_n": choice.completion_tokens,
              "predicted_ms": (ended - first) * 1e3}
    for kind in ("prompt", "predicted"):
        count, ms = result[f"{kind}_n"], result[f"{kind}_ms"]
        if count and ms > 0:
            result[f"{kind}_per_token_ms"] = ms / count
            result[f"{kind}_per_second"] = count * 1e3 / ms
    return result


def _stop_type(choice: Choice) -> tuple[str, str]:
    """llama.cpp's stop_type and stopping_word. An abort (server shutting down) reads as "limit": cut short."""
    if choice.finish_reason == "stop":
        return ("word", choice.stop_reason) if isinstance(choice.stop_reason, str) else ("eos", "")
    return "limit", ""


def _final(generation: Generation, body: LlamaCompletionRequest, prompt: list[int], choice: Choice) -> dict:
    engine = generation.engine
    stop_type, stopping_word = _stop_type(choice)
    result = {"index": 0, "content": choice.text, "tokens": choice.token_ids if body.return_tokens else [],
              "stop": True, "model": generation.model, "tokens_predicted": choice.completion_tokens,
              "tokens_evaluated": choice.prompt_tokens, "tokens_cached": choice.cached_tokens,
              "generation_settings": settings_json(generation.params, engine.max_model_len),
              "prompt": engine.tokenizer.decode(prompt, skip_special_tokens=False),
              "has_new_line": "\n" in choice.text, "truncated": False, "stop_type": stop_type,
              "stopping_word": stopping_word, "timings": timings(choice, generation.started, time.monotonic())}
    if body.n_probs:
        result["completion_probabilities"] = _probs(engine, choice.logprobs)
    return result


@router.post("/completion")
@router.post("/completions")
async def completion(body: LlamaCompletionRequest, request: Request):
    state = get_state(request)
    entry = await state.use_model(request, body.model)
    prompt = await off_loop(request, lambda: _prompt_ids(entry.engine, body.prompt))
    params = await with_constraint(entry.engine, _params(entry.engine, body), llamacpp_constraint(body))
    generation = start_generation(request, entry, [prompt], params, "cmpl")
    if body.stream:
        return streaming(_stream(generation, body, prompt))
    return _final(generation, body, prompt, (await collect(request, generation))[0])


def _stream(generation: Generation, body: LlamaCompletionRequest, prompt: list[int]) -> AsyncIterator[str]:
    """llama.cpp's stream: `data: {...}` per piece of text (content, tokens, stop false), then the final object
    with empty content and stop true; no [DONE]."""
    def each(_: int, out: StepOutput, __):
        if out.text_delta or out.token_ids:
            chunk = {"index": 0, "content": out.text_delta, "tokens": out.token_ids, "stop": False}
            if body.n_probs:
                chunk["completion_probabilities"] = _probs(generation.engine, out.logprobs)
            yield sse(chunk)

    def done(choices: list[Choice]):
        final = {**_final(generation, body, prompt, choices[0]), "content": "", "tokens": []}
        if body.n_probs:
            final["completion_probabilities"] = []  # every token's were streamed with it
        yield sse(final)

    def failed(api: APIError):
        yield sse({"error": {"code": api.status, "message": api.message, "type": api.type}})

    return drive(generation, each, failed, done)


# --- /props and /slots --------------------------------------------------------------------------------------
async def _get_engine(request: Request, model: str | None) -> AsyncEngine:
    """The engine of ?model= (llama.cpp's router mode names it so), else the default model's."""
    entry = await get_state(request).use_model(request, model)
    return entry.engine


def _slot(index: int, n_ctx: int, params: SamplingParams, running: dict | None) -> dict:
    slot = {"id": index, "n_ctx": n_ctx, "is_processing": running is not None,
            "params": settings_json(params, n_ctx)}
    if running is not None:
        remaining = None if running["max_tokens"] is None else running["max_tokens"] - running["output_tokens"]
        slot["id_task"] = running["request_id"]
        slot["next_token"] = {"has_next_token": True, "n_decoded": running["output_tokens"],
                              "n_remain": -1 if remaining is None else remaining}
    return slot


def _defaults() -> SamplingParams:
    """The settings of a /completion request that sets nothing."""
    defaults = LlamaCompletionRequest.model_construct(prompt="")
    return SamplingParams(max_tokens=None, temperature=defaults.temperature, top_k=defaults.top_k,
                          top_p=defaults.top_p, min_p=defaults.min_p, repetition_penalty=defaults.repeat_penalty,
                          repetition_window=defaults.repeat_last_n)


@router.get("/props")
async def props(request: Request, model: str | None = None):
    engine = await _get_engine(request, model)
    template = engine.chat_template
    return {"default_generation_settings": _slot(0, engine.max_model_len, _defaults(), None),
            "total_slots": engine.engine.args.max_num_seqs, "model_path": str(engine.engine.loaded.path),
            "chat_template": template.source if template is not None else "", "modalities": {"vision": False},
            "build_info": f"ember {__version__}"}


@router.get("/slots")
async def slots(request: Request, fail_on_no_slot: int = 0, model: str | None = None):
    """One entry per sequence the engine can run at once: the running ones (oldest first: ids are positions,
    not stable names), then the idle ones with the default settings."""
    engine = await _get_engine(request, model)
    running = await engine.running_sequences()
    total = engine.engine.args.max_num_seqs
    if fail_on_no_slot and len(running) >= total:
        raise APIError(503, "no slot available", code="unavailable", headers={"Retry-After": "1"})
    n_ctx, defaults = engine.max_model_len, _defaults()
    return [_slot(i, n_ctx, running[i]["params"] if i < len(running) else defaults,
                  running[i] if i < len(running) else None) for i in range(total)]
