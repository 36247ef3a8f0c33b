"""Structured output requests: each API's way of asking for constrained text, as one StructuredOutput.

OpenAI `response_format` (and the Responses API's `text.format`), vLLM's `structured_outputs` and older
`guided_*` fields, llama.cpp's `grammar` and `json_schema`, Ollama's `format`. A request may use one of
them; two are a 400 naming both. The grammar is compiled here, on a worker thread, before the request is
queued, so an invalid schema, regex or grammar is a 400 naming its field and the engine's step never waits
for a compilation.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from ember.engine.async_engine import AsyncEngine
from ember.sampling_params import SamplingParams, StructuredOutput
from ember.server.errors import bad_request, not_supported

Constraint = tuple[StructuredOutput, str]  # the constraint and the request field it came from

# vLLM's structured_outputs keys -> kinds. Its switches: disable_fallback holds (there is a single backend to fall
# back from) and so does disable_any_whitespace: true (ember's JSON has no free whitespace); false asks for
# whitespace ember's grammar never allows, and is refused.
_VLLM_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
               "json_object": "json_object", "structural_tag": "structural_tag"}
_VLLM_SWITCHES = {"disable_any_whitespace", "disable_fallback"}


def _schema_text(schema: Any, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise bad_request(f"{field}: the schema is not valid JSON ({err})", param=field) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{field}: a JSON schema must be an object", param=field)
    return json.dumps(schema)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{field}: must be a non-empty string", param=field)
    return value


def _choices(value: Any, field: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise bad_request(f"{field}: must be a non-empty list of non-empty strings", param=field)
    return json.dumps(value)


def _json_format(fmt: dict, field: str) -> StructuredOutput | None:
    """OpenAI's response_format / text.format object: text, json_object or json_schema."""
    kind = fmt.get("type")
    if kind == "text":
        return None
    # llama.cpp puts the schema beside the type ({"type": "json_object", "schema": ...}); OpenAI's chat API nests
    # it in "json_schema", its Responses API flattens it into the format object.
    nested = fmt.get("json_schema")
    if nested is not None and not isinstance(nested, dict):
        raise bad_request(f"{field}.json_schema: must be an object", param=field)
    schema = (nested or {}).get("schema", fmt.get("schema"))
    if kind in ("json_object", "json_schema"):
        if schema is None:
            if kind == "json_schema" and nested is None and "schema" not in fmt:
                raise bad_request(f"{field}: type json_schema needs a json_schema.schema", param=field)
            return StructuredOutput("json_object")
        return StructuredOutput("json_schema", _schema_text(schema, field))
    raise bad_request(f"{field}: type must be text, json_object or json_schema, got {kind!r}", param=field)


def _vllm(value: Any, field: str) -> StructuredOutput:
    if not isinstance(value, dict):
        raise bad_request(f"{field}: must be an object", param=field)
    unknown = sorted(set(value) - set(_VLLM_KINDS) - _VLLM_SWITCHES)
    if unknown:
        raise not_supported(f"{field}.{unknown[0]}", param=field)
    if value.get("disable_any_whitespace") is False:
        raise not_supported(f"{field}.disable_any_whitespace false (JSON is generated without free whitespace)",
                            param=field)
    kinds = [key for key in _VLLM_KINDS if value.get(key) not in (None, False)]
    if len(kinds) != 1:
        raise bad_request(f"{field}: set exactly one of {', '.join(_VLLM_KINDS)}", param=field)
    key = kinds[0]
    spec = value[key]
    if key == "json":
        return StructuredOutput("json_schema", _schema_text(spec, f"{field}.json"))
    if key == "json_object":
        return StructuredOutput("json_object")
    if key == "choice":
        return StructuredOutput("choice", _choices(spec, f"{field}.choice"))
    if key == "structural_tag" and not isinstance(spec, str):
        spec = json.dumps(spec)
    return StructuredOutput(_VLLM_KINDS[key], _text(spec, f"{field}.{key}"))


def _single(found: list[Constraint]) -> Constraint | None:
    if len(found) > 1:
        names = [field for _, field in found]
        raise bad_request(f"{' and '.join(names)}: a request can have one structured output constraint, "
                          f"got {len(names)}", param=names[1])
    return found[0] if found else None


def openai_constraint(body) -> Constraint | None:
    """The constraint of a /v1/chat/completions or /v1/completions body (SamplingFields)."""
    found: list[Constraint] = []

    def add(structured: StructuredOutput | None, field: str) -> None:
        if structured is not None:
            found.append((structured, field))

    if body.response_format is not None:
        add(_json_format(body.response_format.model_dump(exclude_none=True, by_alias=True), "response_format"), "response_format")
    if body.structured_outputs is not None:
        add(_vllm(body.structured_outputs, "structured_outputs"), "structured_outputs")
    if body.guided_json is not None:
        add(StructuredOutput("json_schema", _schema_text(body.guided_json, "guided_json")), "guided_json")
    if body.guided_regex is not None:
        add(StructuredOutput("regex", _text(body.guided_regex, "guided_regex")), "guided_regex")
    if body.guided_choice is not None:
        add(StructuredOutput("choice", _choices(body.guided_choice, "guided_choice")), "guided_choice")
    if body.guided_grammar is not None:
        add(StructuredOutput("grammar", _text(body.guided_grammar, "guided_grammar")), "guided_grammar")
    if body.grammar is not None and body.grammar != "":  # llama.cpp sends "" for "no grammar"
        add(StructuredOutput("grammar", _text(body.grammar, "grammar")), "grammar")
    if body.json_schema is not None:
        add(StructuredOutput("json_schema", _schema_text(body.json_schema, "json_schema")), "json_schema")
    return _single(found)


def responses_constraint(text: dict | None) -> Constraint | None:
    """The Responses API's text.format."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format: must be an object", param="text")
    structured = _json_format(fmt, "text.format")
    return None if structured is None else (structured, "text.format")


def ollama_constraint(fmt: str | dict | None) -> Constraint | None:
    """Ollama's format: "json" or a JSON schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return StructuredOutput("json_object"), "format"
    if isinstance(fmt, dict):
        return StructuredOutput("json_schema", _schema_text(fmt, "format")), "format"
    raise bad_request(f"format: must be \"json\" or a JSON schema object, got {fmt!r}", param="format")


def llamacpp_constraint(body) -> Constraint | None:
    """llama.cpp's /completion: `grammar` (GBNF; "" is none) or `json_schema`."""
    found: list[Constraint] = []
    if body.grammar:
        found.append((StructuredOutput("grammar", body.grammar), "grammar"))
    if body.json_schema is not None:
        found.append((StructuredOutput("json_schema", _schema_text(body.json_schema, "json_schema")), "json_schema"))
    return _single(found)


async def with_constraint(engine: AsyncEngine, params: SamplingParams, constraint: Constraint | None) -> SamplingParams:
    """`params` with the constraint, compiled for the engine's vocabulary off the event loop (the engine then
    finds it in its cache); an invalid spec raises InvalidParameter naming its field, which the server answers
    with 400."""
    if constraint is None:
        return params
    structured, field = constraint
    await asyncio.to_thread(engine.compile_grammar, structured, field)
    return replace(params, structured=structured)
