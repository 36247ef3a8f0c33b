"""Sizes a chat template may build, checked before the operation allocates: a hostile template must get a clear
ChatTemplateError, never a MemoryError or minutes of copying. Each check predicts the size of an operation's
result from its operands (cheaply, without building it) and refuses it above MAX_VALUE_CHARS characters (or
list items); ember.tokenizer.chat_template routes string methods, the sizing filters, `+`, `%`, `~` and `*`
through these checks."""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable
from functools import wraps
from typing import Any

from jinja2 import filters as jinja_filters
from jinja2.utils import generate_lorem_ipsum, pass_eval_context

from ember.errors import ChatTemplateError

MAX_VALUE_CHARS = 4_000_000  # the most characters (or list items) one value a template builds may have
MAX_REPEAT = 1_000_000  # the largest string/list a template may build with `*`
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def check_size(size: int, what: str = "value") -> None:
    if size > MAX_VALUE_CHARS:
        raise ChatTemplateError(f"chat template builds a {what} that is too large ({size} > {MAX_VALUE_CHARS})")


def _width(value: Any) -> int:
    """A width argument's contribution: an int's value, or a string's length (indent accepts both)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return max(value, 0)
    return len(value) if isinstance(value, str) else 0


# --- str methods a template calls (`'x'.center(n)`), checked in the environment's call hook -------------------
def _padded(text: str, width: Any = 0, *_: Any) -> int:
    return max(len(text), _width(width))


def _expanded(text: str, tabsize: Any = 8) -> int:
    return len(text) + text.count("\t") * _width(tabsize)


def _joined(separator: str, items: Any = ()) -> int:
    """For a list or tuple (check_call and the join filter turn other iterables into lists first)."""
    return sum(len(str(i)) for i in items) + max(len(items) - 1, 0) * len(separator)


def _replaced(text: str, old: Any = "", new: Any = "", count: Any = -1) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _str_formatted(text: str, *args: Any, **kwargs: Any) -> int:
    """str.format: widths and precisions in the format specs; nested ones ({:{w}}) come from the arguments."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        return len(text)  # str.format raises the same error
    for _, _, spec, _ in fields:
        if spec:
            for number in _DIGITS.findall(spec):
                check_size(int(number), "formatted field")
            if "{" in spec:
                for value in [*args, *kwargs.values()]:
                    if isinstance(value, int) and not isinstance(value, bool):
                        check_size(value, "formatted field")
    return len(text)


STR_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": _padded, "ljust": _padded, "rjust": _padded, "zfill": _padded, "expandtabs": _expanded,
    "join": _joined, "replace": _replaced, "format": _str_formatted, "format_map": _str_formatted,
}


def checked_call(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Before a template calls `obj`: a str method from STR_METHOD_SIZES must not build too large a string.
    Returns the arguments to call it with: str.join's iterable as a list, walked once to size it."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox hands str.format out wrapped (its own safe formatter)
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", None)
    if isinstance(owner, str) and name in STR_METHOD_SIZES:
        if name == "join" and len(args) == 1 and not isinstance(args[0], (list, tuple, str)):
            args = (list(args[0]),)  # a range (the sandbox caps its length) or a generator
        try:
            size = STR_METHOD_SIZES[name](owner, *args, **kwargs)
        except TypeError:
            return args  # wrong arguments: the call itself raises the error
        check_size(size)
    return args


# --- operators ----------------------------------------------------------------------------------------------
def percent_formatted(fmt: str, args: Any) -> None:
    """`fmt % args` (and the format filter): no width or precision, literal or `*`, above the limit."""
    values = list(args) if isinstance(args, tuple) else [args]
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                star = next((v for v in values if isinstance(v, int)), 0)
                check_size(_width(star), "formatted field")
            elif number:
                check_size(int(number), "formatted field")


def check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT:
                raise ChatTemplateError("chat template builds a value that is too large")
    elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
        raise ChatTemplateError("chat template computes a power that is too large")
    elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        check_size(len(left) + len(right))
    elif operator == "%" and isinstance(left, str):
        percent_formatted(left, right)


def checked_concat(parts: list) -> str:
    """`a ~ b ~ ...`, joined once its size is known to be within the limit."""
    texts = [str(p) for p in parts]
    check_size(sum(map(len, texts)))
    return "".join(texts)


# --- filters that can build more than they are given -----------------------------------------------------------
def _bounded(filter_fn: Callable, predict: Callable[..., int | None]) -> Callable:
    """`filter_fn` behind a size check: `predict` gets the filter's own arguments (after any context argument).
    `wraps` copies the filter's jinja_pass_arg too, so Jinja passes the wrapper what it passed the filter."""
    passes = getattr(filter_fn, "jinja_pass_arg", None)

    @wraps(filter_fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        own = args[1:] if passes is not None else args
        try:
            size = predict(*own, **kwargs)
        except TypeError:
            size = None  # wrong arguments: the filter raises the error
        if size is not None:
            check_size(size)
        return filter_fn(*args, **kwargs)

    return bounded


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _indented(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    text = _text(s)
    return len(text) + (text.count("\n") + 1) * _width(width)


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> str:
    """Jinja's join, sized first: an item's attribute is no longer than the item's text."""
    items = value if isinstance(value, (list, tuple)) else list(value)  # ranges are capped by the sandbox
    check_size(_joined(_text(d), items))
    return jinja_filters.do_join(eval_ctx, items, d, attribute)


def _wrapped(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *_: Any,
             **__: Any) -> int:
    text = _text(s)
    return len(text) * (1 + len(wrapstring if isinstance(wrapstring, str) else "\n"))


def _formatted(value: Any, *args: Any, **kwargs: Any) -> int | None:
    percent_formatted(_text(value), kwargs or args)
    return None


def _padded_batch(value: Any, linecount: Any = 0, fill_with: Any = None) -> int:
    return _width(linecount) if fill_with is not None else 0


def _slices(value: Any, slices: Any = 0, fill_with: Any = None) -> int:
    return _width(slices)


def _summed(iterable: Any, attribute: Any = None, start: Any = 0) -> int | None:
    if isinstance(start, (list, tuple, str)) and isinstance(iterable, (list, tuple)) and attribute is None:
        return len(start) + sum(len(i) for i in iterable if isinstance(i, (list, tuple, str)))
    return None


def json_indented(value: Any, compact_chars: int, indent: Any) -> None:
    """tojson with `indent`: each of at most `compact_chars` lines is indented at most depth × width."""
    width = _width(indent)
    if width:
        check_size(compact_chars * (1 + width * _depth(value)), "JSON text")


def _depth(value: Any) -> int:
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item)
    return deepest


def bounded_lipsum(*args: Any, **kwargs: Any) -> str:
    """Jinja's `lipsum` global, sized first: n paragraphs of at most max(min, max) words, each under 16
    characters with its punctuation and space."""
    bound = inspect.signature(generate_lorem_ipsum).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    check_size(_width(given["n"]) * max(_width(given["min"]), _width(given["max"])) * 16)
    return generate_lorem_ipsum(*bound.args, **bound.kwargs)


def bounded_filters() -> dict[str, Callable]:
    """Jinja's filters that can build a value larger than their input, each behind its size check."""
    return {
        "center": _bounded(jinja_filters.do_center, lambda value, width=80: _padded(_text(value), width)),
        "indent": _bounded(jinja_filters.do_indent, _indented),
        "join": _join,
        "replace": _bounded(jinja_filters.do_replace, lambda s, old, new, count=None: _replaced(
            _text(s), old, new, -1 if count is None else count)),
        "wordwrap": _bounded(jinja_filters.do_wordwrap, _wrapped),
        "format": _bounded(jinja_filters.do_format, _formatted),
        "batch": _bounded(jinja_filters.do_batch, _padded_batch),
        "slice": _bounded(jinja_filters.do_slice, _slices),
        "sum": _bounded(jinja_filters.do_sum, _summed),
    }
