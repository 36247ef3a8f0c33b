"""Every model ember can run without downloading: the store's, and (optionally) other tools' (discovery).

One list for `ember ls` and for the server's model listings (`/v1/models`, `/api/tags`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what `resolve()` accepts
    size: int
    format: str  # gguf | safetensors
    quant: str | None
    parameters: int | None
    modified: float  # Unix time
    source: str  # store | default | huggingface | ollama | lmstudio | local
    path: str | None = None  # discovered models: where they are
    origin: str | None = None  # store models: the HF repo (or the model it was copied from)
    digest: str | None = None  # sha256 of the weights (ember.store.model_info); None when unreadable

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _digest(path) -> str | None:
    from ember.store.model_info import weights_digest

    try:
        return weights_digest(path)
    except OSError as err:  # still listed
        log.debug("cannot hash %s: %s", path, err)
        return None


def _default_entry() -> ModelEntry:
    """The bundled model: always there, runnable without a download."""
    from ember.store.info import describe_path
    from ember.store.resolve import DEFAULT_MODEL_DIR, resolve

    resolved = resolve(None, allow_paths=False)
    files = [p for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file()]
    details = describe_path(DEFAULT_MODEL_DIR)
    return ModelEntry(resolved.name, sum(p.stat().st_size for p in files), resolved.format, details.get("quant"),
                      details.get("parameters"), max(p.stat().st_mtime for p in files), resolved.source,
                      str(DEFAULT_MODEL_DIR), digest=_digest(DEFAULT_MODEL_DIR))


def list_models(include_discovered: bool = False, store=None) -> list[ModelEntry]:
    from ember.store.model_info import combined_digest
    from ember.store.store import ModelStore

    store = store or ModelStore()
    entries = []
    for manifest in store.list():
        details = manifest.details
        weights = {n: f.digest for n, f in manifest.files.items() if n.endswith((".gguf", ".safetensors"))}
        entries.append(ModelEntry(manifest.name, manifest.size, manifest.format, details.get("quant"),
                                  details.get("parameters"), manifest.created, "store", None,
                                  manifest.source.get("repo") or manifest.source.get("copied_from"),
                                  combined_digest(weights) if weights else None))
    entries.append(_default_entry())
    if include_discovered:
        from ember.store.discovery import discover_all
        from ember.store.info import describe_path

        taken = {e.name for e in entries}
        for model in discover_all():
            if model.name in taken:
                continue
            quant, params = model.quant, None
            try:
                details = describe_path(model.path)
                quant, params = details.get("quant") or quant, details.get("parameters")
            except Exception as err:  # a broken file is still listed
                log.debug("cannot describe %s: %s", model.path, err)
            entries.append(ModelEntry(model.name, model.size, model.format, quant, params, model.modified,
                                      model.source, str(model.path), digest=_digest(model.path)))
    return entries
