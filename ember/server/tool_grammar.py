"""The constraint that enforces `tool_choice: "required"` or a named function: the answer must be tool calls in
the model's own format (ember.server.tool_calls), each naming an offered tool and carrying arguments that
satisfy that tool's parameter schema. Written as xgrammar structural tags (StructuredOutput "structural_tag")
for the engine's grammar mask."""

from __future__ import annotations

import json

from ember.sampling_params import StructuredOutput
from ember.server.reasoning import THINK_CLOSE
from ember.server.tool_calls import FIREFUNCTION, GRANITE, HERMES, LLAMA3, MISTRAL, ToolFormat

EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# Consecutive whitespace allowed inside arguments: more than compact or indented JSON needs, few enough that a
# model that keeps choosing whitespace still reaches the end of its call.
MAX_ARGS_SPACE = 16
# Whitespace a thinking model may write between `</think>` and its answer (the grammar starts after `</think>`).
LEADING_SPACE = r"[ \n]{0,4}"
_LISTS = {MISTRAL.name: "[TOOL_CALLS][", GRANITE.name: "<|tool_call|>[", FIREFUNCTION.name: "functools["}


def _call_tag(fmt: ToolFormat, tool: dict):
    from xgrammar.structural_tag import JSONSchemaFormat, TagFormat

    function = tool["function"]
    begin = f'{{"name": {json.dumps(function["name"])}, "{fmt.args_key}": '
    end = "}"
    if fmt is HERMES:
        begin, end = "<tool_call>\n" + begin, "}\n</tool_call>"
    return TagFormat(begin=begin, content=JSONSchemaFormat(json_schema=function.get("parameters") or EMPTY_PARAMETERS,
                                                       max_whitespace_cnt=MAX_ARGS_SPACE),
                     end=end)


def tool_constraint(fmt: ToolFormat, tools: list[dict], required: bool = True, parallel: bool = True,
                    after_reasoning: bool = False) -> StructuredOutput:
    """Required: tool calls only, at least one, each to one of `tools` (pass the single named tool to force
    it). Not required (tool_choice "auto" with parallel_tool_calls false): free text until the model opens a
    call, then that one call, well formed, ends the answer. Without `parallel` (or in a format whose template
    renders one call per message) exactly one call."""
    from xgrammar.structural_tag import (
        ConstStringFormat,
        RegexFormat,
        SequenceFormat,
        StructuralTag,
        TagFormat,
        TagsWithSeparatorFormat,
        TriggeredTagsFormat,
    )

    single = not (parallel and fmt.parallel)
    separator = {HERMES.name: "\n", LLAMA3.name: "; "}.get(fmt.name, ", " if fmt.name in _LISTS else "\n")
    tags = [_call_tag(fmt, t) for t in tools]
    calls = TagsWithSeparatorFormat(tags=tags, separator=separator, at_least_one=True, stop_after_first=single)
    if not required:
        if fmt.name in _LISTS:
            opener = _LISTS[fmt.name]
            tags = [TagFormat(begin=opener, content=calls, end="]")]
        else:
            opener = "<tool_call>" if fmt is HERMES else '{"name": '
        body = TriggeredTagsFormat(triggers=[opener], tags=tags, stop_after_first=True)
    else:
        elements = [calls]
        if fmt.name in _LISTS:
            elements = [ConstStringFormat(value=_LISTS[fmt.name]), calls, ConstStringFormat(value="]")]
        if after_reasoning:
            elements.insert(0, RegexFormat(pattern=LEADING_SPACE))
        body = elements[0] if len(elements) == 1 else SequenceFormat(elements=elements)
    return StructuredOutput("structural_tag", StructuralTag(format=body).model_dump_json(),
                            after=THINK_CLOSE if after_reasoning else None)
