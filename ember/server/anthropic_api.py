"""Anthropic's Messages API: POST /v1/messages (whole or as Anthropic's event stream) and
POST /v1/messages/count_tokens, for clients built on the `anthropic` SDK.

The key may come as `x-api-key` (GuardMiddleware accepts it beside `Authorization: Bearer`); the
`anthropic-version` header is tolerated, as every version's text-only requests look the same here. Errors are
answered in Anthropic's shape (ember.server.errors.error_body picks it by path); the fields ember cannot honour
are refused by name (UNSUPPORTED_FIELDS["anthropic"] in ember.server.protocol)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ember.engine.async_engine import AsyncEngine
from ember.engine.outputs import StepOutput
from ember.sampling_params import SamplingParams
from ember.server.errors import anthropic_error, bad_request, not_supported
from ember.server.generation import Choice, Generation, collect, drive, start_generation
from ember.server.offload import off_loop
from ember.server.openai_api import get_state, sse, streaming
from ember.server.prompting import chat_prompt_ids, encode_chat, render_chat
from ember.server.protocol import AnthropicCountRequest, AnthropicRequest

router = APIRouter()

def _text(content, param: str) -> str:
    """Text of a string or of a list of text blocks; any other block (image, document, tool_use...) is refused."""
    if isinstance(content, str):
        return content
    pieces = []
    for block in content:
        kind = block.get("type")
        if kind != "text":
            raise not_supported(f"content blocks of type {kind!r}", param=param)
        if not isinstance(block.get("text"), str):
            raise bad_request(f"{param}: a text block needs a string 'text'", param=param)
        pieces.append(block["text"])
    return "".join(pieces)


def prompt_ids(engine: AsyncEngine, body: AnthropicCountRequest) -> list[int]:
    """The conversation through the model's chat template. A final assistant message is a prefill: the reply
    continues its text, as Anthropic's API does."""
    messages = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, message in enumerate(body.messages):
        text = _text(message.content, f"messages.{i}.content")
        if i and message.role == body.messages[i - 1].role:
            # Anthropic combines consecutive turns of one role into one (templates may insist on alternation).
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": message.role, "content": text})
    if messages[-1]["role"] != "assistant":
        return chat_prompt_ids(engine, messages)
    prefill = messages.pop()["content"]
    return encode_chat(engine, render_chat(engine, messages) + prefill)


def _stop(choice: Choice) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence. An aborted reply (server shutting down) is cut short like one
    that hit max_tokens: "max_tokens" tells a client the text is incomplete, "end_turn" would claim it is whole."""
    if choice.finish_reason == "stop":
        if isinstance(choice.stop_reason, str):
            return "stop_sequence", choice.stop_reason
        return "end_turn", None
    return "max_tokens", None


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: AnthropicCountRequest, request: Request):
    entry = await get_state(request).use_model(request, body.model)
    return {"input_tokens": len(await off_loop(request, lambda: prompt_ids(entry.engine, body)))}


@router.post("/v1/messages")
async def messages(body: AnthropicRequest, request: Request):
    state = get_state(request)
    entry = await state.use_model(request, body.model)
    prompt = await off_loop(request, lambda: prompt_ids(entry.engine, body))
    kwargs = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k")
              if getattr(body, name) is not None}
    params = SamplingParams(max_tokens=body.max_tokens, stop=body.stop_sequences or [], **kwargs)
    generation = start_generation(request, entry, [prompt], params, "msg")
    message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": entry.name}
    if body.stream:
        return streaming(_events(generation, message, len(prompt)))
    choice = (await collect(request, generation))[0]
    stop_reason, stop_sequence = _stop(choice)
    return {**message, "content": [{"type": "text", "text": choice.text}], "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": choice.prompt_tokens, "output_tokens": choice.completion_tokens}}


async def _events(generation: Generation, message: dict, input_tokens: int) -> AsyncIterator[str]:
    def event(kind: str, **fields) -> str:
        return sse({"type": kind, **fields}, event=kind)

    yield event("message_start", message={**message, "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": input_tokens, "output_tokens": 0}})
    yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    yield event("ping")

    def each(_: int, out: StepOutput, __):
        if out.text_delta:
            yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": out.text_delta})

    def done(choices: list[Choice]):
        choice = choices[0]
        yield event("content_block_stop", index=0)
        stop_reason, stop_sequence = _stop(choice)
        yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    usage={"output_tokens": choice.completion_tokens})
        yield event("message_stop")

    async for item in drive(generation, each, lambda api: [sse(anthropic_error(api), event="error")], done):
        yield item
