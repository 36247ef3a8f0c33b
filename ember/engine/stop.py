"""When a streamed sequence stops, and which of its text may be shown before it does.

A stop string can span several tokens and begin mid-token, so text that could be the start of one is held
back until later tokens settle it. What a stream emits in total is the generated text cut right before the
first stop string (or right after it with include_stop_str_in_output): nothing past a stop is ever shown.
"""

from __future__ import annotations

from ember.sampling_params import SamplingParams


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids: frozenset[int], max_tokens: int):
        self.stop_strings = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        )
        self.min_tokens = params.min_tokens
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self.held = ""  # generated text not yet emitted: the tail that might begin a stop string
        self.stopped_by: str | int | None = None  # the stop string or token id that ended the sequence
        # Only a stop string's first character can open a match, which rules out most positions cheaply.
        self._first_chars = frozenset(stop[0] for stop in self.stop_strings)

    def update(self, token_id: int, text_delta: str) -> tuple[str, str | None]:
        """Feed one generated token and the detokenized text it added; return (text that is now safe to
        emit, finish_reason or None). finish_reason is 'stop' (EOS unless ignore_eos, a stop_token_id, or a
        stop string) or 'length' (max_tokens reached). On a finish, all remaining text is returned."""
        self.num_tokens += 1
        # Nothing stops the first min_tokens tokens: the sampler bans EOS and stop ids there, and a stop
        # string, which cannot be banned, is ignored instead.
        may_stop = self.num_tokens > self.min_tokens
        stopped_by_token = may_stop and token_id in self.stop_token_ids
        if stopped_by_token and not self.include_stop:
            text_delta = ""  # the stop token's own text (often a special token's) is not part of the output
        searched_from = len(self.held)
        self.held += text_delta
        if may_stop and self.stop_strings:
            cut = self._cut_at_stop_string(searched_from)
            if cut is not None:
                self.held = ""
                return cut, "stop"
        if stopped_by_token:
            self.stopped_by = token_id
            return self.flush(), "stop"
        if self.num_tokens >= self.max_tokens:
            return self.flush(), "length"
        keep = self._start_of_possible_stop()
        safe, self.held = self.held[:keep], self.held[keep:]
        return safe, None

    def flush(self) -> str:
        """Held-back text, released when the sequence ends for a reason other than a stop (e.g. abort)."""
        held, self.held = self.held, ""
        return held

    def _cut_at_stop_string(self, searched_from: int) -> str | None:
        """The held text up to the earliest stop string that ends in the newly added text, or None.

        Matches ending in earlier text were already checked (or came before min_tokens and do not count).
        """
        earliest: tuple[int, str] | None = None
        for stop in self.stop_strings:
            index = self.held.find(stop, max(0, searched_from - len(stop) + 1))
            if index >= 0 and (earliest is None or index < earliest[0]):
                earliest = (index, stop)
        if earliest is None:
            return None
        index, stop = earliest
        self.stopped_by = stop
        return self.held[: index + len(stop)] if self.include_stop else self.held[:index]

    def _start_of_possible_stop(self) -> int:
        """Where the held text's longest tail that is a proper prefix of some stop string begins."""
        held = self.held
        longest = max((len(stop) for stop in self.stop_strings), default=1)
        for start in range(max(0, len(held) - longest + 1), len(held)):
            if held[start] not in self._first_chars:
                continue
            tail = held[start:]
            if any(len(tail) < len(stop) and stop.startswith(tail) for stop in self.stop_strings):
                return start
        return len(held)
