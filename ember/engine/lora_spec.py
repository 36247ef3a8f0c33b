"""What names a LoRA adapter to load: `name=path[:scale]` specs (the CLI's --lora, EngineArgs.lora, the server's
load endpoint). Light on imports: the server's pool reads these before any model code is needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.errors import InvalidParameter, LoraError

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@")


@dataclass
class LoraSpec:
    """An adapter to load: `name=path` or `name=path:scale` on the command line."""

    name: str
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        name, sep, rest = text.partition("=")
        if not sep:  # a bare path: named after its file or folder
            name, rest = Path(text.rstrip("/")).stem, text
        path, scale = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a colon in the path itself
        return cls(name, path, scale)


def lora_specs(value) -> list[LoraSpec]:
    """EngineArgs.lora as a list of LoraSpec: from one spec string, a list of strings or LoraSpecs, or None."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, LoraSpec)) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidParameter("lora", f"expected adapter specs (name=path[:scale]), got {value!r}")
    specs = []
    for item in items:
        if not isinstance(item, (str, LoraSpec)):
            raise InvalidParameter("lora", f"expected an adapter spec (name=path[:scale]), got {item!r}")
        specs.append(LoraSpec.parse(item) if isinstance(item, str) else item)
    if len({s.name for s in specs}) != len(specs):
        raise InvalidParameter("lora", "two adapters share a name")
    return specs


def check_name(name) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not set(name) <= _NAME_CHARS:
        raise LoraError(f"lora_name must be 1-128 characters of letters, digits and -_.:/@, got {name!r}")
    return name
