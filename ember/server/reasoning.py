"""A thinking model's output split into reasoning and answer, piece by piece as it streams.

Templates that think (`<think>` ... `</think>`, Qwen3 and DeepSeek-R1 style) either let the model open the
block itself or open it in the generation prompt (then the output starts inside the reasoning). The
whitespace around the block is the template's layout, not text: it is dropped on both sides.
"""

from __future__ import annotations

import re

from ember.server.markers import releasable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_OPEN_AT_END = re.compile(r"<think>\s*$")
_CLOSED_AT_END = re.compile(r"</think>\s*$")


def reasoning_start(prompt_text: str) -> bool | None:
    """How a thinking template left the generation prompt: True when it opened the reasoning (the output
    starts inside it), False when it closed an empty block (thinking switched off: nothing to split), None
    when the model opens its own block (or answers directly)."""
    if _OPEN_AT_END.search(prompt_text):
        return True
    if _CLOSED_AT_END.search(prompt_text):
        return False
    return None


class ReasoningParser:
    """feed(text) -> [("reasoning" | "content", text)]; finish() releases what was held back."""

    def __init__(self, inside: bool = False):
        self.state = "inside" if inside else "start"
        self.pending = ""
        self.strip_next = True  # whitespace opening the reasoning or the answer is layout

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        events: list[tuple[str, str]] = []
        while self.pending:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending = head[len(THINK_OPEN):]
                    self.state, self.strip_next = "inside", True
                    continue
                if THINK_OPEN.startswith(head):
                    break  # maybe the start of <think>: wait
                self.state, self.strip_next = "after", False
            if self.state == "inside":
                if self.strip_next:
                    self.pending = self.pending.lstrip()
                    if not self.pending:
                        break
                    self.strip_next = False
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    self._emit(events, "reasoning", self.pending[:end].rstrip())
                    self.pending = self.pending[end + len(THINK_CLOSE):]
                    self.state, self.strip_next = "after", True
                    continue
                cut = releasable(self.pending, (THINK_CLOSE,), hold_space=True)
                self._emit(events, "reasoning", self.pending[:cut])
                self.pending = self.pending[cut:]
                break
            if self.strip_next:
                self.pending = self.pending.lstrip()
                if not self.pending:
                    break
                self.strip_next = False
            self._emit(events, "content", self.pending)
            self.pending = ""
        return events

    def finish(self) -> list[tuple[str, str]]:
        events: list[tuple[str, str]] = []
        if self.state == "inside":
            self._emit(events, "reasoning", self.pending.rstrip())
        else:
            self._emit(events, "content", self.pending)
        self.pending = ""
        return events

    @staticmethod
    def _emit(events: list, kind: str, text: str) -> None:
        if text:
            events.append((kind, text))
