"""Reasoning split off a thinking model's answer, whole and streamed in arbitrary pieces; how the real
thinking templates leave the generation prompt; constraints start after the reasoning."""

from __future__ import annotations

import pytest

from ember.sampling_params import StructuredOutput
from ember.server.chat_plan import ChatPlan
from ember.server.reasoning import ReasoningParser, reasoning_start
from ember.tokenizer.chat_template import ChatTemplate
from tests.chunked import feed
from tests.conftest import SHARED

CASES = [  # (starts inside, output, reasoning, content)
    (False, "<think>\nThe user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
    (False, "  <think>a</think>b", "a", "b"),
    (False, "Hello, no thinking.", "", "Hello, no thinking."),
    (False, "<thin", "", "<thin"),
    (True, "Let me see.\n</think>\n\nIt is 4.", "Let me see.", "It is 4."),
    (True, "Cut off by the token limit <", "Cut off by the token limit <", ""),
    (False, "<think>x</think>a </think> b", "x", "a </think> b"),
]


def _split(inside: bool, text: str, seed: int | None) -> tuple[str, str]:
    events = feed(ReasoningParser(inside), text, seed, largest=5)
    return ("".join(t for k, t in events if k == "reasoning"), "".join(t for k, t in events if k == "content"))


@pytest.mark.parametrize("inside,text,reasoning,content", CASES)
def test_split_whole_and_streamed(inside, text, reasoning, content):
    for seed in (None, *range(20)):
        assert _split(inside, text, seed) == (reasoning, content), seed


@pytest.mark.parametrize("template,kwargs,expected", [
    ("Qwen-Qwen3-0.6B.jinja", {}, None),  # the model opens <think> itself
    ("Qwen-Qwen3-0.6B.jinja", {"enable_thinking": False}, False),  # an empty block closes it
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", {}, True),  # the prompt opens it
    ("HuggingFaceTB-SmolLM3-3B.jinja", {"enable_thinking": False}, False),
])
def test_reasoning_start_of_real_templates(template, kwargs, expected):
    source = (SHARED / "templates" / template).read_text()
    prompt = ChatTemplate(source, "<s>", "</s>").render([{"role": "user", "content": "Hi"}], **kwargs)
    assert reasoning_start(prompt) is expected


def test_constraints_start_after_the_reasoning():
    schema = StructuredOutput("json_schema", '{"type": "object"}')
    thinking = ChatPlan(prompt=[1], tool_format=None, reasoning=False, constraint=None)
    structured, field = thinking.constrain((schema, "response_format"))
    assert structured.after == "</think>" and field == "response_format"
    plain = ChatPlan(prompt=[1], tool_format=None, reasoning=None, constraint=None)
    assert plain.constrain((schema, "response_format")) == (schema, "response_format")
    assert plain.constrain(None) is None


def test_responses_count_reasoning_tokens_up_to_the_closing_marker(testdata):
    """usage.output_tokens_details.reasoning_tokens is computed: the generated tokens through </think>."""
    from types import SimpleNamespace

    from ember.server.generation import Choice
    from ember.server.openai_api import _reasoning_tokens
    from ember.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(testdata / "vocab" / "ggml-vocab-qwen2.gguf")
    reasoning = tokenizer.encode("The user greets me, so I greet back.</think>", add_special_tokens=False)
    answer = tokenizer.encode("Hello there!", add_special_tokens=False)
    engine = SimpleNamespace(tokenizer=tokenizer)
    choice = Choice(0, token_ids=reasoning + answer)
    assert _reasoning_tokens(engine, choice, [{"type": "reasoning"}, {"type": "message"}]) == len(reasoning)
    assert _reasoning_tokens(engine, choice, [{"type": "message"}]) == 0
    unfinished = Choice(0, token_ids=reasoning[:-4])
    assert _reasoning_tokens(engine, unfinished, [{"type": "reasoning"}]) == len(unfinished.token_ids)
