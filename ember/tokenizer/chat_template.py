"""Chat templates rendered like transformers' `apply_chat_template`, in a sandbox with limits.

Templates come from model files, so they are untrusted code: Jinja's immutable sandbox blocks attribute
tricks, and a deadline, an output cap and size checks on every operation that can build a value larger than
its operands (ember.tokenizer.template_limits) keep a hostile template from hanging or exhausting a server. The environment (filters, globals, trim/lstrip, loop controls, `{% generation %}`)
matches transformers so the rendered strings are identical.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.errors import ChatTemplateError
from ember.tokenizer.template_limits import (
    MAX_VALUE_CHARS,
    bounded_filters,
    bounded_lipsum,
    check_binop,
    checked_call,
    checked_concat,
    json_indented,
)

RENDER_SECONDS = 5.0
MAX_OUTPUT_CHARS = MAX_VALUE_CHARS  # the rendered prompt, like any value a template builds
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_LOOP_FILTER = "ember_timed_iter"
_CONCAT_FILTER = "ember_concat"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders as-is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore attributes, as transformers allows."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus a per-render deadline checked on every call, and bounded sizes."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # intercepted ones are also never constant-folded
    _render_state = threading.local()  # compiled templates are shared, so each thread keeps its own deadline

    @property
    def deadline(self) -> float:
        return getattr(self._render_state, "deadline", float("inf"))

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._render_state.deadline = value

    def _check_time(self):
        if time.monotonic() > self.deadline:
            raise ChatTemplateError("chat template took too long to render")

    def _parse(self, source, name, filename):
        # A loop whose body makes no call (`{% for a in r %}{% for b in r %}...`) would never reach a deadline
        # check, so every `for` iterates through a filter that checks the deadline on each item.
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
        # `a ~ b` compiles to a plain join no hook sees: it becomes one part, joined by a filter that checks sizes.
        for concat in list(tree.find_all(nodes.Concat)):
            parts = nodes.List(concat.nodes, lineno=concat.lineno)
            concat.nodes = [nodes.Filter(parts, _CONCAT_FILTER, [], [], None, None, lineno=concat.lineno)]
        return tree

    def _timed_iter(self, iterable):
        for item in iterable:
            self._check_time()
            yield item

    def call(self, context, obj, *args, **kwargs):
        self._check_time()
        args = checked_call(obj, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._check_time()
        return super().getattr(obj, attribute)

    def call_binop(self, context, operator, left, right):
        self._check_time()
        check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides Jinja's tojson, which would HTML-escape characters.
    if indent:
        json_indented(value, len(json.dumps(value, ensure_ascii=ensure_ascii)), indent)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def _compile(source: str) -> tuple[_LimitedEnvironment, jinja2.Template]:
    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters.update(bounded_filters())
    env.filters["tojson"] = _tojson
    env.filters[_LOOP_FILTER] = env._timed_iter
    env.filters[_CONCAT_FILTER] = checked_concat
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace, lipsum=bounded_lipsum)
    try:
        return env, env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template has a syntax error on line {err.lineno}: {err.message}") from None


def _plain(value: Any) -> Any:
    """Copy of the input made of plain JSON types only, so a template never sees live objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float)):
        return type(value).__mro__[-2](value)
    raise ChatTemplateError(f"chat messages may only hold JSON values, not {type(value).__name__}")


def _alias_reasoning(message: dict) -> dict:
    # transformers passes a message's reasoning under every name templates read it by.
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 time_limit: float = RENDER_SECONDS):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("the chat template is empty")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_limit = time_limit
        self._env, self._template = _compile(source)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               documents: list[dict] | None = None, **kwargs) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("messages must be a list of objects")
        context = {
            "messages": [_alias_reasoning(m) for m in _plain(messages)],
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
            **{name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if value},
            **_plain(kwargs),
        }
        self._env.deadline = time.monotonic() + self.time_limit
        pieces: list[str] = []
        size = 0
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError("chat template output is too large")
                self._env._check_time()
                pieces.append(piece)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as err:
            raise ChatTemplateError(f"chat template tried something unsafe: {err}") from None
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template error: {err}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, RecursionError,
                OverflowError) as err:
            raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from None
        except MemoryError:  # a last resort: the size checks refuse what they can predict before it allocates
            raise ChatTemplateError("chat template ran out of memory") from None
        finally:
            self._env.deadline = float("inf")
        return "".join(pieces)


_PROBE_TOOL = "ember_capability_probe"


@lru_cache(maxsize=64)
def template_capabilities(source: str | None) -> list[str]:
    """What a chat template lets a model do beyond completion: "tools" when it really renders an offered tool
    (probed by rendering one: mentioning `tools` or `tool_calls` is not enough), "thinking" when it writes or
    switches a `<think>` block."""
    if not source:
        return []
    capabilities = []
    if "tools" in source and _renders_tools(source):
        capabilities.append("tools")
    if "<think>" in source or "enable_thinking" in source:
        capabilities.append("thinking")
    return capabilities


def _renders_tools(source: str) -> bool:
    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "A probe.", "parameters": {
        "type": "object", "properties": {"text": {"type": "string", "description": "Any text."}}}}}
    try:
        rendered = ChatTemplate(source, "<s>", "</s>").render([{"role": "user", "content": "Hi"}], tools=[tool])
    except ChatTemplateError:  # a template that cannot render a plain chat with tools does not support them
        return False
    return _PROBE_TOOL in rendered
