"""One entry point that turns a model reference into a ready model, tokenizer and chat template."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.formats.detect import path_format
from ember.loader.device import resolve_device
from ember.models.decoder import CausalLM
from ember.tokenizer import ChatTemplate, Tokenizer, load_tokenizer


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


def load_model(path: str | Path, dtype="auto", device="auto", *, name: str | None = None) -> LoadedModel:
    """Load a GGUF file or a safetensors checkpoint folder; a model's name is resolved to its files before
    (ember.store.resolve), so the loader knows nothing of stores."""
    started = time.perf_counter()
    path = Path(path)
    model_format = path_format(path)
    target = resolve_device(device)
    if model_format == "gguf":
        from ember.loader.gguf_model import load_gguf_model

        net, config, dtype = load_gguf_model(path, dtype, target)
    else:
        from ember.loader.safetensors import load_safetensors_model

        net, config, dtype = load_safetensors_model(path, dtype, target)
    tokenizer = load_tokenizer(path)
    template = None
    if tokenizer.chat_template:
        template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return LoadedModel(name or path.name, path, model_format, net, config, tokenizer, template, dtype, target,
                       time.perf_counter() - started)
