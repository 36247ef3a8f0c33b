"""Shapes of common open models, so memory and speed can be estimated from `--params 70b --family llama`
without downloading anything. Figures are those of the published config.json files."""

from __future__ import annotations

from ember.config import ModelConfig
from ember.errors import EmberError


class UnknownShape(EmberError):
    """No built-in shape matches the asked family and size."""


def _shape(arch: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int,
           context: int, tied: bool) -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                       max_position_embeddings=context, tie_word_embeddings=tied)


# family -> size -> (display name, shape)
SHAPES: dict[str, dict[str, tuple[str, ModelConfig]]] = {
    "llama": {
        "1b": ("Llama-3.2-1B", _shape("llama", 128256, 2048, 8192, 16, 32, 8, 64, 131072, True)),
        "3b": ("Llama-3.2-3B", _shape("llama", 128256, 3072, 8192, 28, 24, 8, 128, 131072, True)),
        "8b": ("Llama-3.1-8B", _shape("llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072, False)),
        "70b": ("Llama-3.3-70B", _shape("llama", 128256, 8192, 28672, 80, 64, 8, 128, 131072, False)),
    },
    "qwen2.5": {
        "0.5b": ("Qwen2.5-0.5B", _shape("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 32768, True)),
        "1.5b": ("Qwen2.5-1.5B", _shape("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, 32768, True)),
        "3b": ("Qwen2.5-3B", _shape("qwen2", 151936, 2048, 11008, 36, 16, 2, 128, 32768, True)),
        "7b": ("Qwen2.5-7B", _shape("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 32768, False)),
        "14b": ("Qwen2.5-14B", _shape("qwen2", 152064, 5120, 13824, 48, 40, 8, 128, 32768, False)),
        "32b": ("Qwen2.5-32B", _shape("qwen2", 152064, 5120, 27648, 64, 40, 8, 128, 32768, False)),
        "72b": ("Qwen2.5-72B", _shape("qwen2", 152064, 8192, 29568, 80, 64, 8, 128, 32768, False)),
    },
    "mistral": {
        "7b": ("Mistral-7B-v0.3", _shape("mistral", 32768, 4096, 14336, 32, 32, 8, 128, 32768, False)),
    },
    "gemma2": {
        "2b": ("Gemma-2-2B", _shape("gemma2", 256000, 2304, 9216, 26, 8, 4, 256, 8192, True)),
        "9b": ("Gemma-2-9B", _shape("gemma2", 256000, 3584, 14336, 42, 16, 8, 256, 8192, True)),
        "27b": ("Gemma-2-27B", _shape("gemma2", 256000, 4608, 36864, 46, 32, 16, 128, 8192, True)),
    },
    "phi3": {
        "mini": ("Phi-3-mini", _shape("phi3", 32064, 3072, 8192, 32, 32, 32, 96, 4096, False)),
        "medium": ("Phi-3-medium", _shape("phi3", 32064, 5120, 17920, 40, 40, 10, 128, 4096, False)),
    },
}
FAMILY_ALIASES = {"llama3": "llama", "llama-3": "llama", "qwen": "qwen2.5", "qwen2": "qwen2.5", "gemma": "gemma2",
                  "gemma-2": "gemma2", "phi": "phi3", "phi-3": "phi3"}
SIZE_ALIASES = {"phi3": {"3.8b": "mini", "4b": "mini", "14b": "medium"}}


def parameter_count(config: ModelConfig) -> int:
    """Weights of the matmuls and embeddings (norms and biases are a rounding error at these sizes)."""
    h = config.hidden_size
    attention = 2 * h * config.num_heads * config.head_dim + 2 * h * config.num_kv_heads * config.head_dim
    mlp = 3 * h * config.intermediate_size
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return config.num_layers * (attention + mlp) + embeddings


def known_shape(params: str, family: str | None = None) -> tuple[str, str, ModelConfig]:
    """(family, display name, shape) for a size such as "70b" in a family (default: the only family with
    that size)."""
    size = params.strip().lower()
    size = size if size.endswith("b") or size in ("mini", "medium") else size + "b"
    if family is None:
        families = [f for f, sizes in SHAPES.items() if size in sizes or size in SIZE_ALIASES.get(f, {})]
        if len(families) != 1:
            found = f"{', '.join(families)} have" if families else "no built-in family has"
            raise UnknownShape(f"{found} a {params!r} model: pass --family ({', '.join(SHAPES)})")
        family = families[0]
    family = FAMILY_ALIASES.get(family.lower(), family.lower())
    if family not in SHAPES:
        raise UnknownShape(f"unknown family {family!r}; known: {', '.join(SHAPES)}")
    size = SIZE_ALIASES.get(family, {}).get(size, size)
    if size not in SHAPES[family]:
        raise UnknownShape(f"no built-in {family} of size {params!r}; known: {', '.join(SHAPES[family])}")
    return (family, *SHAPES[family][size])
