"""Tool calls read out of a model's answer in the model's own format, piece by piece as it streams.

The format comes from the chat template (`tool_format`): Hermes/Qwen `<tool_call>{json}</tool_call>`,
Llama 3.x bare `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`), Mistral
`[TOOL_CALLS][{...}, ...]` or `[TOOL_CALLS]name[ARGS]{...}`, Granite `<|tool_call|>[...]`, FireFunction
`functools[...]`, and for any other template that renders tools a JSON object or list as the whole answer.

`ToolCallParser.feed(text)` turns text into events: ("content", text), ("call", index, id, name),
("args", index, fragment), ("call_done", index). Markup is never released as content while it may still
become a call; arguments are streamed as the model writes them, so the fragments join to the exact JSON
text the model wrote. A complete answer is parsed by feeding it whole: the same events, joined.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass

from ember.server.markers import releasable

MAX_HEAD_CHARS = 4096  # a call's name must come within this many characters to be streamed before it ends
MAX_MISTRAL_NAME_CHARS = 256
PYTHON_TAG = "<|python_tag|>"
# {"name": "...", "arguments": then the first character of an object or array: the part a stream can name.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=[{\[])')


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls.

    opener: the marker that starts calls anywhere in the answer; None: calls only as the whole answer.
    body: what follows it: "object" (one call object, then `closer`), "list" (a JSON array of call
    objects), "mistral" (a list, or name[ARGS]arguments), "answer" (objects or a list as the whole answer).
    args_key: the key the template shows for the arguments; ids: "openai" (call_...) or "mistral" (the
    9 alphanumeric characters Mistral templates insist on).
    """

    name: str
    opener: str | None
    body: str
    closer: str | None = None
    args_key: str = "arguments"
    ids: str = "openai"
    parallel: bool = True  # the template renders several calls in one message


HERMES = ToolFormat("hermes", "<tool_call>", "object", closer="</tool_call>")
LLAMA3 = ToolFormat("llama3", None, "answer", args_key="parameters", parallel=False)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "mistral", ids="mistral")
GRANITE = ToolFormat("granite", "<|tool_call|>", "list")
FIREFUNCTION = ToolFormat("firefunction", "functools", "list")
JSON = ToolFormat("json", None, "answer")
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, GRANITE, FIREFUNCTION, JSON)}


def tool_format(source: str) -> ToolFormat:
    """The call format a chat template teaches its model (call only for templates that render tools)."""
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<tool_call>" in source:
        return HERMES
    if "<|tool_call|>" in source:
        return GRANITE
    if "functools[" in source:
        return FIREFUNCTION
    if "<|start_header_id|>" in source and (PYTHON_TAG in source or '"parameters": ' in source):
        return LLAMA3
    return JSON


def new_call_id(style: str = "openai") -> str:
    if style == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


class _JsonExtent:
    """Where a JSON object, array or string that starts at the first character fed ends."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escape = False

    def feed(self, text: str) -> int | None:
        """Scan the next characters; the index in `text` just past the value's end, once it ends there."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return None


class _ObjectCall:
    """One call written as a JSON object {"name": ..., "arguments" | "parameters": ...}, read as it grows:
    its name once the head is complete, its arguments' text as far as written."""

    def __init__(self):
        self.text = ""
        self.extent = _JsonExtent()
        self.name: str | None = None
        self.args_at = 0
        self.args_end: int | None = None
        self.args_extent: _JsonExtent | None = None
        self.complete = False

    def feed(self, text: str) -> int:
        """Take characters up to the object's end; returns how many were taken."""
        end = self.extent.feed(text)
        used = len(text) if end is None else end
        start = len(self.text)
        self.text += text[:used]
        self.complete = end is not None
        if self.name is None and len(self.text) <= MAX_HEAD_CHARS:
            head = _HEAD.match(self.text)
            if head is not None:
                self.name = json.loads(head.group(1))
                self.args_at = start = head.end()
                self.args_extent = _JsonExtent()
        if self.args_extent is not None and self.args_end is None and start < len(self.text):
            args_end = self.args_extent.feed(self.text[start:])
            if args_end is not None:
                self.args_end = start + args_end
        return used

    @property
    def args_text(self) -> str:
        return self.text[self.args_at:self.args_end] if self.name is not None else ""

    def parsed(self) -> tuple[str, str] | None:
        """A complete object that holds a call in another key order: (name, arguments JSON)."""
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        return _call_of(value)


def _call_of(value) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters"))
    if args is None:
        return None
    return value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


class ToolCallParser:
    """Text pieces in, content and tool-call events out (see the module docstring)."""

    def __init__(self, fmt: ToolFormat, new_id: Callable[[str], str] = new_call_id):
        self.fmt = fmt
        self.new_id = new_id
        self.pending = ""
        self.mode = "start" if fmt.opener is None else "text"
        self.opened = ""  # markup consumed for the calls being read: content again if they turn out not to be
        self.reader: _ObjectCall | None = None
        self.extent: _JsonExtent | None = None  # the arguments of a Mistral name[ARGS]{...} call
        self.started = False
        self.sent = 0
        self.count = 0
        self.after_call = False
        self.events: list[tuple] = []

    @property
    def has_calls(self) -> bool:
        return self.count > 0

    # --- feeding ----------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[tuple]:
        self.pending += text
        while self.pending and self._step():
            pass
        events, self.events = self.events, []
        return events

    def finish(self) -> list[tuple]:
        if self.started or self._fallback():
            self._end_call()
        elif self.reader is not None or self.opened:
            self._content(self.opened + (self.reader.text if self.reader is not None else "") + self.pending)
        elif self.mode in ("start", "plain"):
            self._content(self.pending)
        elif self.mode == "text":  # the answer's trailing whitespace is layout
            self._content(self.pending.rstrip())
        elif self.mode != "closer":  # a cut-off closer is dropped; other leftovers stay content
            self._content(self.pending.strip())
        self.pending, self.reader, self.opened, self.mode = "", None, "", "plain"
        events, self.events = self.events, []
        return events

    def _step(self) -> bool:
        """Advance through `pending` in the current mode; False when it has to wait for more text."""
        return getattr(self, f"_mode_{self.mode}")()

    def _mode_plain(self) -> bool:
        self._content(self.pending)
        self.pending = ""
        return False

    def _mode_start(self) -> bool:
        head = self.pending.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and self.fmt is LLAMA3):
            return False
        space = len(self.pending) - len(head)
        if self.fmt is LLAMA3 and head.startswith(PYTHON_TAG):
            self.opened, self.pending, self.mode = self.pending[:space] + PYTHON_TAG, head[len(PYTHON_TAG):], "objects"
        elif head[0] == "{":
            self.opened, self.pending, self.mode = self.pending[:space], head, "objects"
        elif head[0] == "[":
            self.opened, self.pending, self.mode = self.pending[:space + 1], head[1:], "list"
        else:
            self.mode = "plain"
        return True

    def _mode_text(self) -> bool:
        if self.after_call:  # whitespace after a call is layout
            self.pending = self.pending.lstrip()
            if not self.pending:
                return False
            self.after_call = False
        at = self.pending.find(self.fmt.opener)
        if at < 0:
            cut = releasable(self.pending, (self.fmt.opener,), hold_space=True)
            self._content(self.pending[:cut])
            self.pending = self.pending[cut:]
            return False
        before = self.pending[:at].rstrip()
        self._content(before)
        self.opened = self.pending[len(before):at] + self.fmt.opener  # the space before is layout, unless no call
        self.pending = self.pending[at + len(self.fmt.opener):]
        self.mode = {"object": "object", "list": "list_open", "mistral": "mistral"}[self.fmt.body]
        return True

    def _mode_list_open(self) -> bool:
        head = self.pending.lstrip()
        if not head:
            return False
        if head[0] != "[":
            return self._not_a_call()
        self.opened += self.pending[:len(self.pending) - len(head) + 1]
        self.pending, self.mode = head[1:], "list"
        return True

    def _mode_mistral(self) -> bool:
        head = self.pending.lstrip()
        if not head:
            return False
        if head[0] == "[":
            self.mode = "list_open"
        else:
            self.mode = "mistral_name"
        return True

    def _mode_mistral_name(self) -> bool:
        at = self.pending.find("[ARGS]")
        if at < 0:
            if len(self.pending) > MAX_MISTRAL_NAME_CHARS:
                return self._not_a_call()
            return False
        name = self.pending[:at].split("[CALL_ID]")[0].strip()
        args = self.pending[at + len("[ARGS]"):].lstrip()
        if not args:
            return False
        if not name or any(c.isspace() for c in name) or args[0] not in "{[":
            return self._not_a_call()
        self.opened, self.pending = "", args
        self._start_call(name)
        self.extent, self.mode = _JsonExtent(), "mistral_args"
        return True

    def _mode_mistral_args(self) -> bool:
        end = self.extent.feed(self.pending)
        used = len(self.pending) if end is None else end
        self._args(self.pending[:used])
        self.pending = self.pending[used:]
        if end is None:
            return False
        self._end_call()
        self.mode = "text"
        return True

    def _mode_object(self) -> bool:
        return self._read_object(next_mode="closer")

    def _mode_objects(self) -> bool:
        return self._read_object(next_mode="objects_next")

    def _mode_list(self) -> bool:
        head = self.pending.lstrip()
        if not head:
            return False
        if head[0] == "]" and not self.has_calls:
            return self._not_a_call()
        if head[0] == "]":
            self.pending, self.mode = head[1:], self._after_calls()
            return True
        return self._read_object(next_mode="list_next")

    def _mode_list_next(self) -> bool:
        head = self.pending.lstrip()
        if not head:
            return False
        if head[0] == ",":
            self.pending, self.mode = head[1:], "list"
        elif head[0] == "]":
            self.pending, self.mode = head[1:], self._after_calls()
        else:
            self.mode = self._after_calls()
        return True

    def _mode_objects_next(self) -> bool:
        head = self.pending.lstrip().lstrip(";").lstrip()
        if not head or PYTHON_TAG.startswith(head):
            return False
        if head.startswith(PYTHON_TAG):
            head = head[len(PYTHON_TAG):]
        if head.startswith("{"):
            self.pending, self.mode = head, "objects"
        else:
            self.mode = "plain"
        return True

    def _mode_closer(self) -> bool:
        closer = self.fmt.closer
        head = self.pending.lstrip()
        if not head or (closer.startswith(head) and head != closer):
            return False
        self.pending = head[len(closer):] if head.startswith(closer) else head
        self.mode = "text"
        return True

    # --- one call object ----------------------------------------------------------------------------------
    def _read_object(self, next_mode: str) -> bool:
        if self.reader is None:
            head = self.pending.lstrip()
            if not head:
                return False
            if head[0] != "{":
                return self._not_a_call()
            self.pending, self.reader, self.started, self.sent = head, _ObjectCall(), False, 0
        reader = self.reader
        used = reader.feed(self.pending)
        self.pending = self.pending[used:]
        if reader.name is not None and not self.started:
            self._start_call(reader.name)
        if self.started:
            self._args(reader.args_text[self.sent:])
        if not reader.complete:
            return False
        if not self.started and not self._fallback():
            return self._not_a_call()
        self._end_call()
        self.mode = next_mode
        return True

    def _fallback(self) -> bool:
        """A complete call object whose keys came in another order: the whole call at once."""
        if self.reader is None or not self.reader.complete:
            return False
        call = self.reader.parsed()
        if call is None:
            return False
        self._start_call(call[0])
        self._args(call[1])
        return True

    def _not_a_call(self) -> bool:
        """The markup did not become a call: what was held back is content after all, and stays content."""
        text = self.opened + (self.reader.text if self.reader is not None else "") + self.pending
        self.reader, self.pending, self.opened, self.mode = None, "", "", "plain"
        self._content(text)
        return False

    def _after_calls(self) -> str:
        return "text" if self.fmt.opener is not None else "plain"

    # --- events -------------------------------------------------------------------------------------------
    def _content(self, text: str) -> None:
        if text:
            self.events.append(("content", text))

    def _start_call(self, name: str) -> None:
        self.started, self.sent = True, 0
        self.events.append(("call", self.count, self.new_id(self.fmt.ids), name))

    def _args(self, text: str) -> None:
        if text:
            self.sent += len(text)
            self.events.append(("args", self.count, text))

    def _end_call(self) -> None:
        self.events.append(("call_done", self.count))
        self.count += 1
        self.reader, self.started, self.opened, self.after_call = None, False, "", True
