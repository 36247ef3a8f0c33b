"""Feeding a streaming parser: whole, or in random chunks (the same text must give the same result)."""

from __future__ import annotations

import random


def feed(parser, text: str, seed: int | None = None, largest: int = 6) -> list[tuple]:
    """All of the parser's events for `text`: fed at once (seed None) or in seeded random chunks of 1..largest
    characters, then finished."""
    events = []
    if seed is None:
        events += parser.feed(text)
    else:
        rng, at = random.Random(seed), 0
        while at < len(text):
            size = rng.randint(1, largest)
            events += parser.feed(text[at:at + size])
            at += size
    return events + parser.finish()
