"""ONE resolver from a model reference to files on disk, for every command and the server.

Order: None → the bundled default; an existing path (CLI only); a store name (`family:tag`); a discovered
name (`hf.co/...`, `ollama/...`, `lmstudio/...`, `local/...`); a Hugging Face repo id already pulled into
the store or present in the HF cache. Anything else: "not found; try `ember pull`".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelLoadError
from ember.formats.detect import path_format
from ember.store.names import ModelRef, parse_ref

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path  # a GGUF file (ending in .gguf) or a checkpoint folder
    format: str  # gguf | safetensors
    source: str  # default | path | store | huggingface | ollama | lmstudio | local


def _not_found(ref: str) -> ModelLoadError:
    return ModelLoadError(f"model {ref!r} not found; try `ember pull {ref}` or `ember ls --all`")


def resolve(ref: str | os.PathLike | None, *, allow_paths: bool, store=None) -> ResolvedModel:
    """Find the files for a model reference (see the module docstring); ModelLoadError when there are none."""
    from ember.store.store import ModelStore

    parsed = parse_ref(ref, allow_paths=allow_paths)
    store = store or ModelStore()
    if parsed.kind == "default":
        return ResolvedModel("ember-default", DEFAULT_MODEL_DIR, "safetensors", "default")
    if parsed.kind == "path":
        path = parsed.path
        return ResolvedModel(path.name, path, path_format(path), "path")
    if parsed.kind == "store":
        return _resolve_store(parsed, store)
    if parsed.kind == "discovered":
        return _resolve_discovered(parsed.text, store) or _raise(_not_found(parsed.text))
    if parsed.kind == "hf":
        return _resolve_hf(parsed, store)
    raise _not_found(parsed.text)


def _raise(err: Exception):
    raise err


def _resolve_store(parsed: ModelRef, store) -> ResolvedModel:
    if store.exists(parsed.store_name):
        manifest = store.get(parsed)
        return ResolvedModel(parsed.store_name, store.path_for(parsed), manifest.format, "store")
    tags = store.tags(parsed.family)
    if tags:
        raise ModelLoadError(f"model {parsed.store_name!r} not found; {parsed.family} has tags: {', '.join(tags)}")
    raise _not_found(parsed.text)


def _resolve_discovered(name: str, store) -> ResolvedModel | None:
    from ember.store.discovery import discover_all

    found = discover_all()
    exact = [m for m in found if m.name == name]
    if not exact:
        exact = [m for m in found if m.name.lower() == name.lower()]
    if len(exact) != 1:
        return None
    model = exact[0]
    return ResolvedModel(model.name, model.path, model.format, model.source)


def _resolve_hf(parsed: ModelRef, store) -> ResolvedModel:
    hits = store.find_by_source(parsed.repo, parsed.variant)
    if len(hits) == 1 or (hits and parsed.variant is None and len({m.name for m in hits}) == 1):
        manifest = hits[0]
        return ResolvedModel(manifest.name, store.path_for(manifest.name), manifest.format, "store")
    if len(hits) > 1:
        names = ", ".join(m.name for m in hits)
        raise ModelLoadError(f"{parsed.text!r} matches several stored models ({names}); name one of them")
    from ember.store.discovery import discover_hf

    prefix = f"hf.co/{parsed.repo}".lower()
    cached = [m for m in discover_hf() if m.name.lower() == prefix or m.name.lower().startswith(prefix + ":")]
    if parsed.variant is not None:
        wanted = parsed.variant.lower().removesuffix(".gguf")
        exact = [m for m in cached if m.format == "gguf" and m.path.stem.lower() == wanted]
        tagged = [m for m in cached if m.format == "gguf" and (m.quant or "").lower() == wanted]
        cached = exact or tagged
    else:
        checkpoints = [m for m in cached if m.format == "safetensors"]
        cached = checkpoints or cached
    if len(cached) == 1:
        model = cached[0]
        return ResolvedModel(model.name, model.path, model.format, model.source)
    if len(cached) > 1:
        names = ", ".join(m.name for m in cached)
        raise ModelLoadError(f"{parsed.text!r} matches several cached models ({names}); name one of them")
    raise _not_found(parsed.text)
