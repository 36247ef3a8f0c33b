"""A chat answer taken apart as it streams: reasoning first (ember.server.reasoning), then the answer's tool
calls (ember.server.tool_calls) and its content; the reasoning is never read for tool calls.

Events: ("reasoning", text), ("content", text), ("call", index, id, name), ("args", index, fragment),
("call_done", index). `ParsedMessage` joins them; a whole answer is parsed by feeding it in one piece.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ember.server.reasoning import ReasoningParser
from ember.server.tool_calls import ToolCallParser, ToolFormat


class ChatOutputParser:
    def __init__(self, reasoning: bool | None = None, tool_format: ToolFormat | None = None):
        """reasoning: None (no split), False (the model may open `<think>`), True (it starts inside)."""
        self.reasoning = ReasoningParser(inside=reasoning) if reasoning is not None else None
        self.tools = ToolCallParser(tool_format) if tool_format is not None else None

    def feed(self, text: str) -> list[tuple]:
        if self.reasoning is None:
            return self._answer(text)
        return self._route(self.reasoning.feed(text))

    def finish(self) -> list[tuple]:
        events = self._route(self.reasoning.finish()) if self.reasoning is not None else []
        return events + (self.tools.finish() if self.tools is not None else [])

    def _route(self, events: list[tuple]) -> list[tuple]:
        routed = []
        for event in events:
            routed += [event] if event[0] == "reasoning" else self._answer(event[1])
        return routed

    def _answer(self, text: str) -> list[tuple]:
        if self.tools is None:
            return [("content", text)] if text else []
        return self.tools.feed(text)


@dataclass
class ParsedMessage:
    reasoning: str = ""
    content: str = ""
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments" (JSON text)}

    def add(self, events: list[tuple]) -> None:
        for event in events:
            kind = event[0]
            if kind == "reasoning":
                self.reasoning += event[1]
            elif kind == "content":
                self.content += event[1]
            elif kind == "call":
                self.calls.append({"id": event[2], "name": event[3], "arguments": ""})
            elif kind == "args":
                self.calls[event[1]]["arguments"] += event[2]


def parse_whole(parser: ChatOutputParser, text: str) -> ParsedMessage:
    message = ParsedMessage()
    message.add(parser.feed(text))
    message.add(parser.finish())
    return message


def arguments_object(arguments: str) -> dict | None:
    """A call's arguments as the object Ollama reports; None when the text is not one (a call cut short)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
