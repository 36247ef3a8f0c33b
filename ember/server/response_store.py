"""The Responses API's memory: the conversation behind each stored response, so that a request naming
`previous_response_id` continues it. In process memory only, bounded: the oldest are forgotten first."""

from __future__ import annotations

from collections import OrderedDict

MAX_STORED_RESPONSES = 1000
MAX_STORED_CHARS = 64 << 20  # all stored conversations together


class ResponseStore:
    def __init__(self, max_items: int = MAX_STORED_RESPONSES, max_chars: int = MAX_STORED_CHARS):
        self.max_items = max_items
        self.max_chars = max_chars
        self._items: OrderedDict[str, list[dict]] = OrderedDict()
        self._chars = 0

    def get(self, response_id: str) -> list[dict] | None:
        """The messages (inputs and replies, without the instructions) up to and including that response."""
        return self._items.get(response_id)

    def put(self, response_id: str, messages: list[dict]) -> None:
        self._items[response_id] = messages
        self._chars += _size(messages)
        while self._items and (len(self._items) > self.max_items or self._chars > self.max_chars):
            _, dropped = self._items.popitem(last=False)
            self._chars -= _size(dropped)


def _size(messages: list[dict]) -> int:
    return sum(len(str(m.get("content", ""))) for m in messages)
