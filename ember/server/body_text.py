"""Text a JSON body cannot carry: bytes that are not UTF-8 (RFC 8259: JSON between systems is UTF-8), and lone
UTF-16 surrogates, which JSON may escape (`"\\ud800"`) and Python decodes into a str that is not valid Unicode: no
tokenizer, template or encoder can take it. Every body is checked once, where the server reads it
(ember.server.app), so each endpoint answers 400 in its API's error shape, naming the byte or the field."""

from __future__ import annotations

import json
import re

from ember.server.errors import APIError, bad_request
from ember.tokenizer.tokenizer import lone_surrogate

# A `\uD800`..`\uDFFF` escape: without one, a body cannot hold a surrogate (raw ones are invalid UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def body_text_error(body: bytes) -> APIError | None:
    """400 for a body that is not UTF-8 or holds a lone surrogate; None otherwise."""
    return invalid_utf8_error(body) or lone_surrogate_error(body)


def invalid_utf8_error(body: bytes) -> APIError | None:
    """400 naming the first byte that is not UTF-8 (else the route's JSON reader answers a vague message)."""
    if body.isascii():
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return bad_request(f"the request body is not valid UTF-8: byte 0x{body[err.start]:02X} at offset {err.start} "
                           f"({err.reason}); JSON must be sent as UTF-8", code="invalid_utf8")
    return None


def lone_surrogate_error(body: bytes) -> APIError | None:
    """400 naming the first field whose text holds a lone surrogate; None for any other body (a body that is
    not JSON is left to the route, which reports it)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = _first_bad_text(value)
    if found is None:
        return None  # only well-formed pairs (or an escaped backslash before "ud8..")
    path, surrogate = found
    return bad_request(f"{path or 'the request body'}: holds a lone UTF-16 surrogate U+{surrogate:04X}, which is not "
                       "a character (JSON \\uD800-\\uDFFF escapes come in pairs)", param=path or None,
                       code="invalid_unicode")


def _first_bad_text(value) -> tuple[str, int] | None:
    """The dotted path of the first string (key or value) holding a lone surrogate, and that surrogate; walked
    without recursion (json.loads accepts nesting deeper than Python's recursion limit)."""
    pending = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if (found := lone_surrogate(item)) is not None:
                return path, found[1]
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                name = key.encode("utf-8", "backslashreplace").decode()  # the path itself must be valid text
                child_path = f"{path}.{name}" if path else name
                if (found := lone_surrogate(key)) is not None:
                    return child_path, found[1]
                pending.append((child, child_path))
        elif isinstance(item, list):
            pending.extend((child, f"{path}.{i}" if path else str(i)) for i, child in reversed(list(enumerate(item))))
    return None
