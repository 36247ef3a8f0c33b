"""The routing key of a request: hashes of its prompt's leading text, block by block.

Each replica's prefix cache holds the KV blocks of the prompts it has seen; a request whose prompt starts like an
earlier one is cheapest on the replica that served that one. The ingress cannot tokenize (it holds no model), so
it keys on text: the prompt-bearing fields of the body (the system prompt, the messages, the prompt or input),
serialized in a fixed order and cut into blocks of `BLOCK_CHARS` characters, each block's hash chained over
every block before it, as the KV cache chains its token blocks. Two requests share the first k hashes exactly
when their texts share the first k blocks; a conversation's next turn starts with the whole of the previous one,
so it shares all of that turn's full blocks (sticky sessions need nothing more).
"""

from __future__ import annotations

import hashlib
import json

BLOCK_CHARS = 128  # about 32 tokens: a couple of KV blocks
MAX_BLOCKS = 256  # the first 32K characters decide; hashing more would buy nothing but work
# The fields that go into the prompt, in the order the templates put them first (all three APIs' names).
PROMPT_FIELDS = ("system", "instructions", "messages", "input", "prompt", "content")


def prompt_text(body: dict) -> str:
    """The prompt-bearing fields of a request body as one string (empty when it has none)."""
    parts = [json.dumps(body[name], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
             for name in PROMPT_FIELDS if body.get(name) is not None]
    return "\x1e".join(parts)


def prefix_hashes(text: str, salt: str = "") -> tuple[int, ...]:
    """Chained hashes of the full `BLOCK_CHARS` blocks of `text` (at most MAX_BLOCKS); `salt` (the model's
    name) keeps the keys of different models apart, as their caches are."""
    hashes, parent = [], hashlib.blake2b(salt.encode(), digest_size=8).digest()
    data = text[: BLOCK_CHARS * MAX_BLOCKS]
    for start in range(0, len(data) - BLOCK_CHARS + 1, BLOCK_CHARS):
        parent = hashlib.blake2b(parent + data[start : start + BLOCK_CHARS].encode(), digest_size=8).digest()
        hashes.append(int.from_bytes(parent, "little"))
    return tuple(hashes)


def parse_body(body: bytes) -> dict | None:
    """A request body's JSON object; None for anything else (nothing to route on: the replica will answer it,
    with its own error if it is malformed)."""
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def prefix_key(body: dict | None) -> tuple[int, ...]:
    """The prefix hashes of a parsed request body (parse_body); () when it has no prompt."""
    if body is None:
        return ()
    model = body.get("model")
    return prefix_hashes(prompt_text(body), model if isinstance(model, str) else "")


def routing_key(body: bytes) -> tuple[int, ...]:
    """The prefix hashes of a raw request body; () for a body that is not a JSON object."""
    return prefix_key(parse_body(body))
