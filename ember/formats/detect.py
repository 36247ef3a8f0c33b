"""Which of the two model formats a path holds: a GGUF file, or a safetensors checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from ember.errors import ModelLoadError
from ember.formats.gguf import has_gguf_magic


def path_format(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "safetensors"
        raise ModelLoadError(f"{path}: a model folder needs config.json")
    if path.is_file():
        if has_gguf_magic(path):
            return "gguf"
        raise ModelLoadError(f"{path}: not a GGUF file")
    raise ModelLoadError(f"model {str(path)!r} not found (give a GGUF file or a folder with config.json)")
