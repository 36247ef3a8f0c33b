"""From request bodies to token ids: chat messages through the model's template, prompts in every OpenAI
shape, and the text of a single token for logprobs."""

from __future__ import annotations

import json
from typing import Any

from ember.engine.async_engine import AsyncEngine
from ember.server.errors import bad_request, not_supported

_TEXT_PARTS = {"text", "input_text", "output_text"}


def content_text(content: Any, param: str = "messages") -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{param}: a {kind} part needs a string 'text'", param=param)
            pieces.append(text)
        else:
            raise not_supported(f"message content of type {kind!r}", param=param)
    return "".join(pieces)


def plain_messages(messages: list[Any]) -> list[dict]:
    """Pydantic messages (or dicts) as template-ready dicts with text content and tool calls."""
    plain = []
    for message in messages:
        data = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)
        data["content"] = content_text(data.get("content"))
        if "tool_calls" in data:
            calls = template_tool_calls(data.pop("tool_calls"))
            if calls:  # templates test `'tool_calls' in message`: an empty list would read as calls
                data["tool_calls"] = calls
        plain.append(data)
    return plain


def template_tool_calls(calls: Any, param: str = "messages") -> list[dict]:
    """An assistant message's tool calls as templates read them: arguments as an object (Llama and Mistral
    templates write them with tojson; OpenAI clients send JSON text), as vLLM passes them."""
    if not isinstance(calls, list):
        raise bad_request(f"{param}: tool_calls must be a list", param=param)
    result = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{param}: each tool call needs a function with a name", param=param)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass  # kept as the text the client sent
        elif not isinstance(arguments, dict):
            raise bad_request(f"{param}: tool call arguments must be an object or JSON text", param=param)
        result.append({**call, "type": call.get("type", "function"), "function": {**function, "arguments": arguments}})
    return result


def render_chat(engine: AsyncEngine, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> str:
    template_kwargs = template_kwargs or {}
    template = engine.chat_template
    reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(template_kwargs)
    if reserved:
        raise bad_request(f"chat_template_kwargs: {sorted(reserved)[0]!r} cannot be set here",
                          param="chat_template_kwargs")
    if template is None:  # no template in the model: a plain transcript the model can continue
        lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
        if add_generation_prompt:
            lines.append("assistant:")
        return "\n".join(lines)
    return template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs)


def encode_prompt(engine: AsyncEngine, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
    """A prompt's token ids; a text whose length alone proves it cannot fit the context is refused before any of
    it is tokenized (the tokenizer's sound bound, ember.tokenizer.length_bound), so a multi-megabyte body costs
    no tokenizing. Shorter texts are left to the engine's exact check (ember.server.generation.validate)."""
    tokenizer, context = engine.tokenizer, engine.max_model_len
    if len(text) >= context:  # a shorter text cannot be proven too long: every token covers at least 1 character
        least = tokenizer.min_tokens(text)
        if least >= context:
            raise bad_request(f"{param}: the text has {len(text)} characters, so at least {least} tokens, more than "
                              f"the context of {context} allows", param=param, code="context_length_exceeded")
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def encode_chat(engine: AsyncEngine, text: str) -> list[int]:
    # A template writes its own BOS; only the template-less transcript needs the tokenizer's.
    return encode_prompt(engine, text, add_special_tokens=engine.chat_template is None, param="messages")


def chat_prompt_ids(engine: AsyncEngine, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> list[int]:
    return encode_chat(engine, render_chat(engine, messages, tools, add_generation_prompt, template_kwargs))


def prompt_ids_list(engine: AsyncEngine, prompt: Any, param: str = "prompt") -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of token-id lists, as token-id lists."""
    if isinstance(prompt, str):
        return [encode_prompt(engine, prompt, param=param)]
    if not prompt:
        raise bad_request(f"{param}: must not be empty", param=param)
    if isinstance(prompt[0], str):
        return [encode_prompt(engine, p, param=param) for p in prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


def token_text(engine: AsyncEngine, token_id: int) -> str:
    tokenizer = engine.tokenizer
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if tokenizer.id_to_piece(token_id).startswith("\u2581") and not text.startswith(" "):
        text = " " + text  # SentencePiece drops the word-start space when decoding a lone token
    return text


def fim_prompt_ids(engine: AsyncEngine, prefix: str, suffix: str, param: str = "suffix") -> list[int]:
    """A fill-in-the-middle prompt, prefix-suffix-middle as code models are trained (and llama.cpp builds it):
    [BOS] PRE prefix SUF suffix MID; the model writes what goes between prefix and suffix."""
    tokenizer = engine.tokenizer
    if tokenizer.fim_token_ids is None:
        raise bad_request(f"{param}: this model's vocabulary has no fill-in-the-middle tokens", param=param)
    pre, suf, mid = tokenizer.fim_token_ids
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos else []
    return [*bos, pre, *encode_prompt(engine, prefix, add_special_tokens=False), suf,
            *encode_prompt(engine, suffix, add_special_tokens=False, param=param), mid]
