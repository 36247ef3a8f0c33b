"""One entry point that turns a model reference into a ready model, tokenizer and chat template."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.encoder_config import EncoderConfig
from ember.loader.device import resolve_device
from ember.models.decoder import CausalLM
from ember.tokenizer import ChatTemplate, Tokenizer, load_tokenizer
from ember.tokenizer.encoder_tokenizer import EncoderTokenizer


@dataclass
class LoadedModel:
    name: str
    path: Path
    format: str  # "safetensors" | "gguf"
    model: CausalLM  # or an encoder (ember.models.bert) when config is an EncoderConfig
    config: ModelConfig | EncoderConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    encoder_tokenizer: EncoderTokenizer | None = None  # an encoder's inputs with [CLS]/[SEP] and truncation

    @property
    def is_encoder(self) -> bool:
        return isinstance(self.config, EncoderConfig)


def load_model(model: str | Path | None, dtype="auto", device="auto", *, allow_paths: bool = True) -> LoadedModel:
    """Load what `model` names: a path (CLI), a store or discovered name, a HF repo id; None: the bundled model."""
    from ember.store.resolve import resolve

    started = time.perf_counter()
    resolved = resolve(model, allow_paths=allow_paths)
    path = resolved.path
    target = resolve_device(device)
    if resolved.format == "gguf":
        from ember.loader.gguf_model import load_gguf_model

        net, config, dtype = load_gguf_model(path, dtype, target)
    else:
        from ember.loader.safetensors import load_safetensors_model

        net, config, dtype = load_safetensors_model(path, dtype, target)
    tokenizer = load_tokenizer(path)
    template = encoder_tokenizer = None
    if isinstance(config, EncoderConfig):
        if path.is_dir():
            encoder_tokenizer = EncoderTokenizer.from_dir(path, config.max_seq_length, config.lowercase)
        else:
            encoder_tokenizer = EncoderTokenizer.from_gguf_tokenizer(tokenizer, config.max_seq_length)
    elif tokenizer.chat_template:
        template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return LoadedModel(resolved.name, path, resolved.format, net, config, tokenizer, template, dtype, target,
                       time.perf_counter() - started, encoder_tokenizer)
