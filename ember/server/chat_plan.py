"""What a chat request asks beyond its messages, checked and settled once for every chat API: the tools
offered (OpenAI's function-tool shape), `tool_choice` and `parallel_tool_calls`, thinking on or off; then the
prompt, how the answer is taken apart (ChatOutputParser) and the constraint that enforces a required call."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ember.engine.async_engine import AsyncEngine
from ember.sampling_params import SamplingParams, StructuredOutput
from ember.server.chat_output import ChatOutputParser
from ember.server.constraints import Constraint
from ember.server.errors import bad_request, not_supported
from ember.server.prompting import encode_chat, render_chat
from ember.server.reasoning import THINK_CLOSE, THINK_OPEN, reasoning_start
from ember.server.tool_calls import ToolFormat, tool_format
from ember.server.tool_grammar import tool_constraint
from ember.tokenizer.chat_template import template_capabilities

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHOICES = ("none", "auto", "required")


def check_tools(tools: Any, param: str = "tools") -> list[dict] | None:
    """Function tools {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"{param}: must be a list of at most {MAX_TOOLS} tools", param=param)
    names = set()
    for tool in tools:
        if not isinstance(tool, dict):
            raise bad_request(f"{param}: each tool must be an object", param=param)
        if tool.get("type", "function") != "function":
            raise not_supported(f"tools of type {tool.get('type')!r} (only function tools)", param=param)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{param}: a function tool needs a 'function' object", param=param)
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad_request(f"{param}: a function name must be 1 to 64 letters, digits, '_', '.' or '-', "
                              f"got {name!r}", param=param)
        if name in names:
            raise bad_request(f"{param}: two tools are named {name!r}", param=param)
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise bad_request(f"{param}: {name}: description must be a string", param=param)
        if not isinstance(function.get("parameters", {}), dict):
            raise bad_request(f"{param}: {name}: parameters must be a JSON schema object", param=param)
    return tools


def check_tool_choice(choice: Any, tools: list[dict] | None, param: str = "tool_choice") -> str | dict:
    """"none", "auto", "required", or the one tool a named choice forces."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise bad_request(f"{param}: must be one of {', '.join(CHOICES)} or a named function, got {choice!r}",
                              param=param)
        if choice == "required" and not tools:
            raise bad_request(f"{param}: 'required' needs tools", param=param)
        return choice
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")  # chat / responses
    if not isinstance(name, str):
        raise bad_request(f"{param}: a named choice is {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                          param=param)
    for tool in tools or []:
        if tool["function"]["name"] == name:
            return tool
    raise bad_request(f"{param}: no tool is named {name!r}", param=param)


@dataclass
class ChatPlan:
    prompt: list[int]
    tool_format: ToolFormat | None  # None: the answer is not read for tool calls
    reasoning: bool | None  # None: no reasoning to split off; True: the answer starts inside it
    constraint: StructuredOutput | None  # the tool calls tool_choice requires
    # Markers the parser reads (a tool-call opener, </think>) that are special tokens in this vocabulary, as
    # Mistral's [TOOL_CALLS] and Llama 3.1's <|python_tag|> are: the answer must keep special tokens' text.
    keep_special_tokens: bool = False

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """The request's parameters as this plan needs them decoded."""
        return replace(params, skip_special_tokens=False) if self.keep_special_tokens else params

    def parser(self) -> ChatOutputParser:
        return ChatOutputParser(self.reasoning, self.tool_format)

    def constrain(self, constraint: Constraint | None) -> Constraint | None:
        """The request's own constraint ((structured output, the field that set it), or None) joined with the
        tool calls this plan requires: the tool constraint, or the request's own starting after the reasoning."""
        if self.constraint is not None:
            if constraint is not None:
                raise bad_request(f"tool_choice: tool calls the request requires cannot be combined with "
                                  f"{constraint[1]}", param="tool_choice")
            return self.constraint, "tools"
        if constraint is not None and self.reasoning is not None and constraint[0].after is None:
            return replace(constraint[0], after=THINK_CLOSE), constraint[1]
        return constraint


def plan_chat(engine: AsyncEngine, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
              parallel_tool_calls: bool | None = None, template_kwargs: dict | None = None,
              add_generation_prompt: bool = True, think: bool | None = None) -> ChatPlan:
    """`think` (Ollama's switch): passed to the template as enable_thinking; False also skips the split."""
    tools = check_tools(tools)
    choice = check_tool_choice(tool_choice, tools)
    template = engine.chat_template
    capabilities = template_capabilities(template.source if template is not None else None)
    template_kwargs = dict(template_kwargs or {})
    if think is not None:
        if think and "thinking" not in capabilities:
            raise bad_request("think: this model does not support thinking", param="think")
        template_kwargs.setdefault("enable_thinking", think)
    offered = tools if choice != "none" else None
    if offered and "tools" not in capabilities:
        raise bad_request("tools: this model's chat template does not support tools", param="tools")
    text = render_chat(engine, messages, offered, add_generation_prompt, template_kwargs)
    reasoning = None
    if "thinking" in capabilities and think is not False and add_generation_prompt:
        start = reasoning_start(text)
        reasoning = None if start is False else bool(start)
    fmt = tool_format(template.source) if offered else None
    constraint = None
    if offered and (choice != "auto" or parallel_tool_calls is False):
        allowed = offered if isinstance(choice, str) else [choice]
        constraint = tool_constraint(fmt, allowed, required=choice != "auto", parallel=parallel_tool_calls is not False,
                                     after_reasoning=reasoning is not None)
    markers = [m for m in (fmt.opener, fmt.closer) if m] if fmt is not None else []
    if reasoning is not None:
        markers += [THINK_OPEN, THINK_CLOSE]
    return ChatPlan(encode_chat(engine, text), fmt, reasoning, constraint,
                    any(is_special_marker(engine.tokenizer, m) for m in markers))


def is_special_marker(tokenizer, marker: str) -> bool:
    """Whether `marker` is one special token of the vocabulary (dropped from text that skips special tokens)."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    return len(ids) == 1 and tokenizer.is_special(ids[0])
