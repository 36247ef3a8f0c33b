"""Tool-call parsing on literal model outputs of every format, whole and streamed in arbitrary pieces; the
format and capabilities read from the shared real templates; the tool_choice constraints (xgrammar) accept
exactly what the parsers read as calls."""

from __future__ import annotations

import json
import random

import pytest

from ember.server.chat_output import ChatOutputParser, ParsedMessage, parse_whole
from ember.server.prompting import plain_messages
from ember.server.tool_calls import FORMATS, ToolCallParser, tool_format
from ember.server.tool_grammar import tool_constraint
from ember.tokenizer.chat_template import ChatTemplate, template_capabilities
from tests.chunked import feed
from tests.conftest import SHARED

TEMPLATES = SHARED / "templates"

# (format, model output, expected content, expected [(name, arguments text)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "}\\" <tool_call>"}]}}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris"}'), ("f", '{"a": [1, {"b": "}\\" <tool_call>"}]}')]),
    ("hermes", "no call < here <tool_ca", "no call < here <tool_ca", []),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "g"}</tool_call> after', "after", [("g", '{"x": 1}')]),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", '{"city": "Paris"}')]),
    ("llama3", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": "y"}}', "",
     [("a", "{}"), ("b", '{"x": "y"}')]),
    ("llama3", '{"just": "json"}', '{"just": "json"}', []),
    ("llama3", 'Hello {"name": "x", "parameters": {}}', 'Hello {"name": "x", "parameters": {}}', []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]', "",
     [("a", '{"q": 1}'), ("b", "{}")]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b[ARGS]{}', "",
     [("get_weather", '{"city": "Paris"}'), ("b", "{}")]),
    ("mistral", "Hi [TOOL_CALLS] oops", "Hi [TOOL_CALLS] oops", []),
    ("granite", '<|tool_call|>[{"name": "a", "arguments": {"q": "\\"}"}}]', "", [("a", '{"q": "\\"}"}')]),
    ("firefunction", 'functools[{"name": "a", "arguments": {"q": 2}}]', "", [("a", '{"q": 2}')]),
    ("json", '[{"name": "a", "arguments": {"q": 1}}]', "", [("a", '{"q": 1}')]),
    ("json", " plain answer ", " plain answer ", []),
    ("json", '{"name": "a", "arguments": "{\\"q\\": 1}"}', "", [("a", '{"q": 1}')]),
]


def _parse(fmt: str, text: str, seed: int | None = None) -> tuple[str, list[tuple[str, str]], list[tuple]]:
    events = feed(ToolCallParser(FORMATS[fmt]), text, seed)
    message = ParsedMessage()
    message.add(events)
    return message.content, [(c["name"], c["arguments"]) for c in message.calls], events


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parser_whole_and_streamed(fmt, text, content, calls):
    assert _parse(fmt, text)[:2] == (content, calls)
    for seed in range(25):
        got_content, got_calls, events = _parse(fmt, text, seed)
        assert (got_content, got_calls) == (content, calls), seed
        # a call's first event names it, then only argument fragments and its end follow
        starts = [e for e in events if e[0] == "call"]
        assert [e[1] for e in starts] == list(range(len(calls)))
        assert all(e[2].startswith("call_") or fmt == "mistral" for e in starts)


def test_mistral_ids_fit_its_templates():
    _, _, events = _parse("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}]')
    call_id = next(e[2] for e in events if e[0] == "call")
    assert len(call_id) == 9 and call_id.isalnum()


def test_reasoning_is_never_read_for_calls():
    text = '<think>maybe <tool_call>{"name": "x", "arguments": {}}</tool_call></think>\n\nNo call.'
    for seed in (None, 1, 2, 3):
        parser = ChatOutputParser(reasoning=False, tool_format=FORMATS["hermes"])
        if seed is None:
            message = parse_whole(parser, text)
        else:
            message, rng, at = ParsedMessage(), random.Random(seed), 0
            while at < len(text):
                size = rng.randint(1, 4)
                message.add(parser.feed(text[at:at + size]))
                at += size
            message.add(parser.finish())
        assert message.reasoning == 'maybe <tool_call>{"name": "x", "arguments": {}}</tool_call>'
        assert (message.content, message.calls) == ("No call.", [])


EXPECTED = {  # template -> (capabilities, call format)
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja": (["tools"], "json"),
    "HuggingFaceTB-SmolLM3-3B.jinja": (["thinking"], None),
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": (["tools"], "mistral"),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": (["tools"], "hermes"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": (["tools"], "hermes"),
    "Qwen-QwQ-32B.jinja": (["tools", "thinking"], "hermes"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": (["tools"], "hermes"),
    "Qwen-Qwen3-0.6B.jinja": (["tools", "thinking"], "hermes"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": (["thinking"], None),
    "fireworks-ai-llama-3-firefunction-v2.jinja": ([], None),  # reads its tools from `functions`, not `tools`
    "google-gemma-2-2b-it.jinja": ([], None),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": (["tools", "thinking"], "granite"),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": (["tools"], "llama3"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": (["tools"], "llama3"),
    "meta-llama-Llama-3.3-70B-Instruct.jinja": (["tools"], "llama3"),
    "microsoft-Phi-3.5-mini-instruct.jinja": ([], None),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": (["tools"], "mistral"),
}


@pytest.mark.parametrize("template", sorted(EXPECTED))
def test_capabilities_and_format_of_real_templates(template):
    source = (TEMPLATES / template).read_text()
    capabilities, fmt = EXPECTED[template]
    assert template_capabilities(source) == capabilities
    if fmt is not None:
        assert tool_format(source).name == fmt


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
             "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now"}}]
CANONICAL = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]',
    "granite": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "json": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
}


@pytest.mark.parametrize("fmt", sorted(CANONICAL))
def test_required_constraint_accepts_exactly_calls(fmt):
    from xgrammar import Grammar
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = Grammar.from_structural_tag(tool_constraint(FORMATS[fmt], TOOLS).spec)
    text = CANONICAL[fmt]
    assert accepts(grammar, text)
    assert _parse(fmt, text)[1][0] == ("get_weather", '{"city": "Paris"}')  # what the grammar allows, the parser reads
    assert not accepts(grammar, "Sure, here you go.")
    assert not accepts(grammar, text.replace("get_weather", "get_time"))  # only offered tools
    assert not accepts(grammar, text.replace('"city"', '"town"'))  # arguments follow the schema
    named = Grammar.from_structural_tag(tool_constraint(FORMATS[fmt], [TOOLS[1]]).spec)
    assert not accepts(named, text)


def test_auto_without_parallel_calls_allows_text_then_one_call():
    from xgrammar import Grammar
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = Grammar.from_structural_tag(tool_constraint(FORMATS["hermes"], TOOLS, required=False, parallel=False).spec)
    assert accepts(grammar, "Just text.")
    assert accepts(grammar, 'Text <tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert not accepts(grammar, '<tool_call>\n{"name": "now", "arguments": {"x": }\n</tool_call>')


def test_openai_arguments_text_reaches_templates_as_an_object():
    source = (TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    template = ChatTemplate(source, "<s>", "</s>")

    def conversation(arguments):
        return [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]

    as_text = template.render(plain_messages(conversation('{"city": "Paris"}')), tools=TOOLS)
    assert as_text == template.render(plain_messages(conversation({"city": "Paris"})), tools=TOOLS)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in as_text
    assert json.dumps("21 C")[1:-1] in as_text


def test_markers_that_are_special_tokens_keep_special_tokens_in_the_answer(testdata):
    """A marker the parser reads must survive detokenization: when it is one special token of the vocabulary
    (Mistral's [TOOL_CALLS], Llama 3.1's <|python_tag|>), the request decodes with special tokens kept."""
    from ember.sampling_params import SamplingParams
    from ember.server.chat_plan import ChatPlan, is_special_marker
    from ember.tokenizer import load_tokenizer

    llama3 = load_tokenizer(testdata / "vocab" / "ggml-vocab-llama-bpe.gguf")
    qwen = load_tokenizer(testdata / "vocab" / "ggml-vocab-qwen2.gguf")
    assert is_special_marker(llama3, "<|eot_id|>")  # one control token
    assert not is_special_marker(qwen, "<tool_call>")  # plain text in this vocabulary: several ordinary tokens
    assert not is_special_marker(llama3, "[TOOL_CALLS]")
    keeping = ChatPlan([1], None, None, None, keep_special_tokens=True)
    assert keeping.sampling(SamplingParams()).skip_special_tokens is False
    assert ChatPlan([1], None, None, None).sampling(SamplingParams()).skip_special_tokens is True
