"""Streaming text split at markers (`<think>`, `<tool_call>`...): how much of a piece may be released now
because no marker can start inside it."""

from __future__ import annotations


def partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a marker (a marker cut between two
    pieces), so that part is held back until the next piece says what it is."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def releasable(text: str, markers: tuple[str, ...], hold_space: bool = False) -> int:
    """How many leading characters of `text` can be released: all but a partial marker at the end and, with
    `hold_space`, the whitespace before it (dropped if a marker follows, released if text does)."""
    end = len(text) - partial_marker_length(text, markers)
    if hold_space:
        end = len(text[:end].rstrip())
    return end
