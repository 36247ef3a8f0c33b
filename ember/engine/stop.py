"""Stop conditions for a streamed sequence: EOS / stop token ids, stop strings, max_tokens.

Text that might be the start of a stop string is held back until the next tokens settle it, so a stream
never shows text that a stop string later cuts off.
"""

from __future__ import annotations

from ember.sampling_params import SamplingParams


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids: frozenset[int], max_tokens: int):
        self.stop_strings = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.min_tokens = params.min_tokens
        self.max_tokens = max_tokens
        self.generated = 0
        self.held = ""  # text withheld because it could begin a stop string

    def update(self, token_id: int, text_delta: str) -> tuple[str, str | None]:
        """Take one generated token and its text; return (text safe to emit now, finish reason or None)."""
        self.generated += 1
        if token_id in self.stop_ids and self.generated > self.min_tokens:
            return self.flush(), "stop"
        text = self.held + text_delta
        self.held = ""
        if self.stop_strings and self.generated > self.min_tokens:
            cut = self._first_stop(text)
            if cut is not None:
                return cut, "stop"
        if self.generated >= self.max_tokens:
            return text, "length"
        hold = self._partial_stop_length(text)
        if hold:
            text, self.held = text[:-hold], text[-hold:]
        return text, None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _first_stop(self, text: str) -> str | None:
        best = None
        for stop in self.stop_strings:
            index = text.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        return text[: index + len(stop)] if self.include_stop else text[:index]

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
