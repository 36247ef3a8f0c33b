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
    source: str  # store | huggingface | ollama | lmstudio | local
    path: str | None = None  # discovered models: where they are
    origin: str | None = None  # store models: the HF repo (or the model it was copied from)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def list_models(include_discovered: bool = False, store=None) -> list[ModelEntry]:
    from ember.store.store import ModelStore

    store = store or ModelStore()
    entries = []
    for manifest in store.list():
        details = manifest.details
        entries.append(ModelEntry(manifest.name, manifest.size, manifest.format, details.get("quant"),
                                  details.get("parameters"), manifest.created, "store", None,
                                  manifest.source.get("repo") or manifest.source.get("copied_from")))
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
                                      model.source, str(model.path)))
    return entries
