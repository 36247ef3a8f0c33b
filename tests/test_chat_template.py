"""ember's sandboxed chat-template renderer matches transformers on real templates and contains hostile ones."""

from __future__ import annotations

import json
import time
import tracemalloc
from datetime import datetime

import jinja2
import pytest

import ember
from ember.errors import ChatTemplateError
from tests.conftest import SHARED

TEMPLATE_DIR = SHARED / "templates"
TEMPLATES = sorted(p.name for p in TEMPLATE_DIR.glob("*.jinja")) if TEMPLATE_DIR.is_dir() else []
BOS, EOS = "<s>", "</s>"
FROZEN_NOW = datetime(2024, 7, 26, 9, 30)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
# Command R's tool-use template reads Cohere's own tool format.
COHERE_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameter_definitions": {"city": {"description": "The city, e.g. Paris", "type": "str", "required": True}},
}
TOOL_CALL_ID = "call12345"  # Mistral templates insist on 9 alphanumeric characters

CONVERSATIONS = {
    "system_user": {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello! Who are you?"},
    ]},
    "multi_turn": {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
        {"role": "user", "content": "And 3+3? Answer in 日本語, with an émoji 🙂."},
    ]},
    "no_generation_prompt": {"add_generation_prompt": False, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
    ]},
    "tools": {"tools": True, "messages": [{"role": "user", "content": "What's the weather in Paris?"}]},
    "tool_call_and_result": {"tools": True, "messages": [
        {"role": "system", "content": "Use the tools when they help."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": TOOL_CALL_ID, "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
        ]},
        {"role": "tool", "tool_call_id": TOOL_CALL_ID, "name": "get_weather",
         "content": '{"temperature": 21, "unit": "celsius"}'},
    ]},
    "documents": {"kwargs": {"documents": [
        {"title": "France", "text": "Paris is the capital of France."},
        {"title": "Spain", "text": "Madrid is the capital of Spain."},
    ]}, "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    "no_thinking": {"kwargs": {"enable_thinking": False}, "messages": [{"role": "user", "content": "Hi"}]},
    "reasoning_history": {"kwargs": {"reasoning_effort": "low"}, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Bye"},
    ]},
}
# Variables some templates need to render at all (the caller supplies them in practice).
TEMPLATE_KWARGS = {
    "fireworks-ai-llama-3-firefunction-v2.jinja": {
        "functions": json.dumps([WEATHER_TOOL["function"]], indent=2), "datetime": "2024-07-26"},
}
TEMPLATE_TOOLS = {"CohereForAI-c4ai-command-r-plus-tool_use.jinja": [COHERE_TOOL]}


@pytest.fixture(autouse=True)
def _offline_frozen_clock(monkeypatch):
    """No network, and `strftime_now` sees the same fixed moment in both renderers."""
    import transformers.utils.chat_template_utils as hf_templates

    import ember.tokenizer.chat_template as ember_templates

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN_NOW

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_templates, "datetime", FrozenDatetime)
    monkeypatch.setattr(ember_templates, "datetime", FrozenDatetime)


def _raised_in_template(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            return True
        tb = tb.tb_next
    return isinstance(err, jinja2.TemplateError)


@pytest.mark.skipif(not TEMPLATES, reason="shared test data not present")
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_matches_transformers(template, conversation):
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (TEMPLATE_DIR / template).read_text(encoding="utf-8")
    case = CONVERSATIONS[conversation]
    messages = case["messages"]
    tools = TEMPLATE_TOOLS.get(template, [WEATHER_TOOL]) if case.get("tools") else None
    add_generation_prompt = case.get("add_generation_prompt", True)
    kwargs = {"date_string": "26 Jul 2024", **TEMPLATE_KWARGS.get(template, {}), **case.get("kwargs", {})}

    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=source, add_generation_prompt=add_generation_prompt,
            bos_token=BOS, eos_token=EOS, **kwargs)
        want: str | BaseException = rendered[0]
    except Exception as err:  # the template rejected this conversation (raise_exception, missing fields, ...)
        if not _raised_in_template(err):
            pytest.skip(f"transformers rejects the inputs before rendering: {type(err).__name__}: {err}")
        want = err

    template_obj = ember.ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    if isinstance(want, BaseException):
        with pytest.raises(ChatTemplateError) as caught:
            template_obj.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        assert str(want) in str(caught.value)
    else:
        got = template_obj.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        assert got == want
        assert messages == CONVERSATIONS[conversation]["messages"]  # the caller's messages are not modified


@pytest.mark.skipif(not TEMPLATES, reason="shared test data not present")
def test_strftime_now_uses_the_clock():
    source = (TEMPLATE_DIR / "ibm-granite-granite-3.3-2B-Instruct.jinja").read_text(encoding="utf-8")
    out = ember.ChatTemplate(source).render([{"role": "user", "content": "Hi"}])
    assert "July 26, 2024" in out


@pytest.mark.skipif(not TEMPLATES, reason="shared test data not present")
@pytest.mark.parametrize("template", TEMPLATES)
def test_comparison_is_not_vacuous(template):
    """Each template renders most of the conversations, so the comparisons above compare strings, not errors."""
    source = (TEMPLATE_DIR / template).read_text(encoding="utf-8")
    rendered = 0
    template_obj = ember.ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    for case in CONVERSATIONS.values():
        # tool-use templates need tools in every chat; some others fail on any tools
        for tools in (None, TEMPLATE_TOOLS.get(template, [WEATHER_TOOL])):
            try:
                template_obj.render(case["messages"], tools=tools, **TEMPLATE_KWARGS.get(template, {}),
                                    **case.get("kwargs", {}))
                rendered += 1
                break
            except ChatTemplateError:
                pass
    assert rendered >= len(CONVERSATIONS) // 2


def _render(source: str, time_limit: float = 1.0, **kwargs) -> str:
    return ember.ChatTemplate(source, time_limit=time_limit).render([{"role": "user", "content": "hi"}], **kwargs)


@pytest.mark.parametrize("source", [
    "{% for i in range(10**9) %}{{ i }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # No call, attribute or output inside the loops: only a per-iteration check can stop it.
    "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% for c in r %}{% endfor %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
], ids=["range_1e9", "nested_range", "silent_nested_loops", "recursion"])
def test_runaway_templates_stop(source):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError):
        _render(source, time_limit=0.5)
    assert time.monotonic() - start < 3.0


def test_loop_semantics_survive_the_deadline_guard():
    source = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}{% endfor %}|"
              "{% for x in [] %}x{% else %}empty{% endfor %}|"
              "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|"
              "{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{{ loop.revindex }}{% endfor %}|"
              "{% for n in [{'c': [{'c': []}]}] recursive %}[{{ loop.depth }}{{ loop(n.c) }}]{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ember.ChatTemplate(source).render(messages) == "1/22/2!|empty|a=1|2241|[1[2]]"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ raise_exception.__globals__ }}",
    "{{ (messages|first).items.__self__.__class__ }}",
])
def test_sandbox_escapes_are_blocked(source):
    # Jinja's sandbox either raises SecurityError (wrapped) or yields an undefined value that prints as nothing.
    try:
        out = _render(source)
    except ChatTemplateError as err:
        assert "unsafe" in str(err)
    else:
        assert out == ""


@pytest.mark.parametrize("source", [
    "{% set x = [] %}{{ x.append(1) }}{{ x }}",
    "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ messages.pop() }}",
])
def test_containers_are_immutable(source):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ember.ChatTemplate(source).render(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_raise_exception_message():
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported x"):
        _render("{{ raise_exception('Only user and assistant roles are supported x') }}")


@pytest.mark.parametrize("source", [
    "{{ 'a' * 10**9 }}",
    "{{ 10**9 * 'a' }}",
    "{{ 'a' * 1000000 * 1000 }}",
    "{{ [0] * 10**9 }}",
    "{{ 2 ** 100000000 }}",
    "{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}",
    # one filter, method or operator building a huge string or list (issue #18)
    "{{ 'ab'|center(10**9) }}",
    "{{ 'a'|indent(10**9) }}",
    "{{ ('\n' * 100000)|indent('x' * 1000) }}",
    "{{ range(10**9)|join }}",
    "{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s]|join }}",
    "{{ range(5000)|join('x' * 1000) }}",
    "{{ ('x' * 1000).join(range(5000)|map('string')) }}",
    "{% set s = 'x' * 1000000 %}{{ 'aaaaaa'|replace('a', s) }}",
    "{{ '%*s'|format(10**9, 'a') }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '%.999999999f' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=10**9) }}",
    "{{ 'x'.center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '0'.zfill(10**9) }}",
    "{{ '\t'.expandtabs(10**9) }}",
    "{% set s = 'x' * 1000000 %}{{ s ~ s ~ s ~ s ~ s }}",
    "{% set s = 'x' * 1000000 %}{{ s + s + s + s + s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{{ [1]|batch(10**9, 0)|list|length }}",
    "{{ [1]|slice(10**9)|list|length }}",
    "{{ messages|tojson(indent=10**9) }}",
    "{{ ([[0] * 1000000] * 100)|sum(start=[])|length }}",
    "{{ lipsum(10**9) }}",
])
def test_huge_values_fail_fast_without_allocating(source):
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError):
            _render(source, time_limit=5.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 3.0
    assert peak < 64 * 2**20


SIZED_OPERATIONS = (
    "{{ 'ab'|center(7) }}|{{ 'a\nb\n\nc'|indent(2, true, true) }}|{{ 'a\nb'|indent('> ') }}|{{ [1, 2]|join(', ') }}|"
    "{{ 'aXbX'|replace('X', '--', 1) }}|{{ 'a b c d'|wordwrap(3) }}|{{ '%-4s|%3d|%.2f' % ('a', 7, 2.5) }}|"
    "{{ '%s=%s'|format('k', 'v') }}|{{ '{:>5}|{:{w}}|{}'.format('r', 'n', 'x', w=3) }}|{{ 'x'.ljust(3) ~ '|' }}"
    "{{ '7'.zfill(3) }}|{{ 'a\tb'.expandtabs(4) }}|{{ [1, 2, 3]|batch(2, 0)|list }}|{{ [1, 2, 3]|slice(2)|list }}|"
    "{{ [[1], [2]]|sum(start=[]) }}|{{ 'a' + 'b' }}|{{ [1] + [2] }}|{{ 'x' ~ 1 ~ none }}|{{ '-'.join(['a', 'b']) }}|"
    "{{ 'ab'.replace('b', 'cd') }}|{{ 'a'.center(5, '*') }}|{{ 2 ** 10 }}|{{ 'ab' * 3 }}"
)


def test_sized_operations_render_as_jinja_does():
    """The size-checked filters, methods and operators give what Jinja's own sandbox gives (the oracle)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    expected = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(SIZED_OPERATIONS)
    assert _render(SIZED_OPERATIONS) == expected.render(messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("source", ["", "   ", "{% if %}", "{% for x in y %}", "{{ 1 + }}"])
def test_bad_templates(source):
    with pytest.raises(ChatTemplateError):
        ember.ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_messages_must_be_json():
    template = ember.ChatTemplate("{{ messages[0].content }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": object()}])
    with pytest.raises(ChatTemplateError):
        template.render("not a list")  # type: ignore[arg-type]


def test_deadline_is_per_render():
    template = ember.ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", time_limit=0.2)
    messages = [{"role": "user", "content": "x"}]
    assert template.render(messages) == "x"
    time.sleep(0.3)  # a finished render leaves no deadline behind for the next one
    assert template.render(messages) == "x"
