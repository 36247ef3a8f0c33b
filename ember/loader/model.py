"""One entry point that turns a model reference into a ready model, tokenizer and chat template."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.encoder_config import EncoderConfig
from ember.errors import ModelLoadError, TokenizerError
from ember.formats.detect import path_format
from ember.loader.device import resolve_device
from ember.loader.weights import Progress
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


@contextlib.contextmanager
def _naming_the_file(path: Path):
    """Load errors raised where the file is not known ("config: hidden_size=...", "tensor type IQ1_S is not
    supported") get the model's file or folder name in front, so a user can tell which model is bad."""
    try:
        yield
    except (ModelLoadError, TokenizerError) as err:
        if path.name in str(err):
            raise
        raise type(err)(f"{path.name}: {err}") from None


def load_model(path: str | Path, dtype="auto", device="auto", *, name: str | None = None,
               progress: Progress | None = None) -> LoadedModel:
    """Load a GGUF file or a safetensors checkpoint folder; a model's name is resolved to its files before
    (ember.store.resolve), so the loader knows nothing of stores. `progress` is told how many of the weights'
    bytes are read (ember.loader.weights.Progress)."""
    started = time.perf_counter()
    path = Path(path)
    model_format = path_format(path)
    target = resolve_device(device)
    with _naming_the_file(path):
        if model_format == "gguf":
            from ember.loader.gguf_model import load_gguf_model

            net, config, dtype = load_gguf_model(path, dtype, target, progress)
        else:
            from ember.loader.safetensors import load_safetensors_model

            net, config, dtype = load_safetensors_model(path, dtype, target, progress)
        tokenizer = load_tokenizer(path)
    template = encoder_tokenizer = None
    if isinstance(config, EncoderConfig):
        if path.is_dir():
            encoder_tokenizer = EncoderTokenizer.from_dir(path, config.max_seq_length, config.lowercase)
        else:
            encoder_tokenizer = EncoderTokenizer.from_gguf_tokenizer(tokenizer, config.max_seq_length)
    elif tokenizer.chat_template:
        template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return LoadedModel(name or path.name, path, model_format, net, config, tokenizer, template, dtype, target,
                       time.perf_counter() - started, encoder_tokenizer)
