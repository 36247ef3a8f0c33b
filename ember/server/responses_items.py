"""The Responses API's shapes around the shared chat path (ember.server.chat_plan, chat_output): its flat function
tools in the chat form, its function_call / function_call_output input items as chat messages, and a parsed
answer as output items (reasoning, message, function_call) with the stream events that build them."""

from __future__ import annotations

import uuid
from typing import Any

from ember.server.chat_output import ChatOutputParser
from ember.server.errors import bad_request, not_supported
from ember.server.prompting import content_text, template_tool_calls


def chat_tools(tools: Any) -> list[dict] | None:
    """{"type": "function", "name", "description"?, "parameters"?, "strict"?} as chat's nested function tools
    (which chat_plan.check_tools then checks); any other tool type (web_search, file_search, ...) is refused."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise bad_request("tools: must be a list of tool objects", param="tools")
    converted = []
    for tool in tools:
        if tool.get("type") != "function":
            raise not_supported(f"tools of type {tool.get('type')!r} (only function tools)", param="tools")
        converted.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return converted


def input_messages(items: list[dict]) -> list[dict]:
    """Input items as template-ready chat messages: a function_call joins the assistant message before it (its
    text and parallel calls are one turn), a function_call_output is a role "tool" message."""
    messages: list[dict] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if not isinstance(call["id"], str) or not isinstance(item.get("arguments", ""), str):
                raise bad_request("input: a function_call needs a call_id and arguments as JSON text", param="input")
            (call,) = template_tool_calls([call], "input")
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise bad_request("input: a function_call_output needs a call_id and an output", param="input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content_text(output, "input")})
        elif kind == "message" and isinstance(item.get("role"), str):
            content = item.get("content")
            if not isinstance(content, (str, list)) or (isinstance(content, list)
                                                        and not all(isinstance(p, dict) for p in content)):
                raise bad_request("input: a message's content must be a string or a list of content parts",
                                  param="input")
            messages.append({"role": item["role"], "content": content_text(content, "input")})
        else:
            raise not_supported(f"input items of type {kind!r}", param="input")
    return messages


class OutputItems:
    """A generated answer as output items, built as the parser's events arrive; each step returns the stream
    events (kind, fields) that announce it. Items are opened in the order the answer gives them."""

    def __init__(self, parser: ChatOutputParser):
        self.parser = parser
        self.items: list[dict] = []
        self.open: dict | None = None

    def feed(self, text: str) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        for event in self.parser.feed(text):
            events += self._event(event)
        return events

    def finish(self, status: str) -> list[tuple[str, dict]]:
        """The parser's last events and every item closed with `status` ("completed" or "incomplete"); an answer
        with no item at all is an empty message."""
        events: list[tuple[str, dict]] = []
        for event in self.parser.finish():
            events += self._event(event)
        if not self.items:
            events += self._start("message")
        return events + self._close(status)

    def message(self) -> dict:
        """The answer as a template-ready assistant message (kept for previous_response_id)."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        return {"role": "assistant", "content": text, **({"tool_calls": template_tool_calls(calls)} if calls else {})}

    def _event(self, event: tuple) -> list[tuple[str, dict]]:
        kind = event[0]
        if kind in ("reasoning", "content"):
            wanted = "reasoning" if kind == "reasoning" else "message"
            events = self._start(wanted) if self.open is None or self.open["type"] != wanted else []
            self.open["content"][0]["text"] += event[1]
            delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            return events + [(delta, {**self._where(), "content_index": 0, "delta": event[1], **extra})]
        if kind == "call":
            return self._start("function_call", call_id=event[2], name=event[3])
        if kind == "args":
            self.open["arguments"] += event[2]
            return [("response.function_call_arguments.delta", {**self._where(), "delta": event[2]})]
        return []  # call_done: the call is closed when the next item opens or the answer ends

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _start(self, kind: str, **fields) -> list[tuple[str, dict]]:
        events = self._close("completed")
        if kind == "function_call":
            item = {"type": kind, "id": f"fc_{uuid.uuid4().hex}", **fields, "arguments": "", "status": "in_progress"}
            part = None
        elif kind == "message":
            item = {"type": kind, "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress", "role": "assistant",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"type": kind, "id": f"rs_{uuid.uuid4().hex}", "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        self.items.append(item)
        self.open = item
        events.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": _copy(item)}))
        if part is not None:
            item["content"].append(part)
            events.append(("response.content_part.added", {**self._where(), "content_index": 0, "part": dict(part)}))
        return events

    def _close(self, status: str) -> list[tuple[str, dict]]:
        item = self.open
        if item is None:
            return []
        events = []
        if item["type"] == "function_call":
            events.append(("response.function_call_arguments.done",
                           {**self._where(), "name": item["name"], "arguments": item["arguments"]}))
        else:
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            events.append((done, {**self._where(), "content_index": 0, "text": part["text"], **extra}))
            events.append(("response.content_part.done", {**self._where(), "content_index": 0, "part": dict(part)}))
        item["status"] = status
        events.append(("response.output_item.done", {"output_index": len(self.items) - 1, "item": _copy(item)}))
        self.open = None
        return events


def _copy(item: dict) -> dict:
    return {**item, **({"content": [dict(p) for p in item["content"]]} if "content" in item else {})}
