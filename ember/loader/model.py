"""One entry point that turns a model reference into a ready model, tokenizer and chat template."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.loader.device import resolve_device
from ember.models.decoder import CausalLM
from ember.tokenizer import ChatTemplate, Tokenizer, load_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"


@dataclass
class LoadedModel:
    name: str
    path: Path
    format: str  # "safetensors" | "gguf"
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    dtype: torch.dtype
    device: torch.device
    load_seconds: float


def resolve_model_path(model: str | Path | None) -> Path:
    """A path, store name, discovered name or HF repo id → the GGUF file or folder (see ember.store.resolve)."""
    if model is None or str(model) == "":
        return DEFAULT_MODEL_DIR
    from ember.store.resolve import resolve

    return resolve(model, allow_paths=True).path


def load_model(model: str | Path | None, dtype="auto", device="auto") -> LoadedModel:
    started = time.perf_counter()
    path = resolve_model_path(model)
    target = resolve_device(device)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from ember.loader.gguf_model import load_gguf_model

        fmt = "gguf"
        net, config, dtype = load_gguf_model(path, dtype, target)
    elif path.is_dir():
        from ember.loader.safetensors import load_safetensors_model

        fmt = "safetensors"
        net, config, dtype = load_safetensors_model(path, dtype, target)
    else:
        raise ModelLoadError(f"{path}: not a GGUF file or a model folder")
    tokenizer = load_tokenizer(path)
    template = None
    if tokenizer.chat_template:
        template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    name = "ember-default" if path == DEFAULT_MODEL_DIR else path.name
    return LoadedModel(name, path, fmt, net, config, tokenizer, template, dtype, target,
                       time.perf_counter() - started)
