"""Tiny random transformers checkpoints of every supported family, written to disk for ember to load."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}

# name -> (transformers config class, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-rope-llama3": ("LlamaConfig", {"rope_parameters": ROPE_LLAMA3}),
    "llama-rope-linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama-rope-dynamic": ("LlamaConfig", {"max_position_embeddings": 32,
                                           "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama-rope-yarn": ("LlamaConfig", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                            "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": 12, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 32, "pad_token_id": 0,
                            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                "long_factor": [2.0 + 0.3 * i for i in range(8)]}}),
    "gemma2": ("Gemma2Config", {"sliding_window": 12, "head_dim": 16, "query_pre_attn_scalar": 16,
                                "hidden_activation": "gelu_pytorch_tanh"}),
}


def build_tiny_model(family: str, directory: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of `family` (with a copy of the tiny-llama tokenizer)."""
    import transformers

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # widen the random init so logits are far from uniform and ties are rare
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(directory)
    return directory


def copy_tokenizer(source: Path, directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)
