"""Maps a checkpoint's `architectures` / `model_type` (or GGUF `general.architecture`) to its model class."""

from __future__ import annotations

from ember.errors import ModelLoadError
from ember.models.bert import BertModel
from ember.models.decoder import CausalLM
from ember.models.gemma2 import Gemma2ForCausalLM
from ember.models.llama import LlamaForCausalLM
from ember.models.mistral import MistralForCausalLM
from ember.models.nomic_bert import NomicBertModel
from ember.models.phi3 import Phi3ForCausalLM
from ember.models.qwen2 import Qwen2ForCausalLM
from ember.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: tuple[type[CausalLM], ...] = (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Phi3ForCausalLM,
    Gemma2ForCausalLM,
)

ENCODER_CLASSES: tuple[type[BertModel], ...] = (BertModel, NomicBertModel)


def encoder_class_for(architecture: str) -> type[BertModel]:
    """The encoder class for an EncoderConfig.architecture ("bert" or "nomic-bert")."""
    for cls in ENCODER_CLASSES:
        if architecture in cls.model_types:
            return cls
    raise ModelLoadError(f"unsupported encoder architecture {architecture!r}")


def supported_architectures() -> list[str]:
    return [name for cls in MODEL_CLASSES for name in cls.architectures]


def model_class_for(architectures: list[str] | None, model_type: str | None) -> tuple[type[CausalLM], str]:
    """Return the model class and its registry key (its first model_type) or a one-line error."""
    for cls in MODEL_CLASSES:
        if any(a in cls.architectures for a in architectures or []) or model_type in cls.model_types:
            return cls, cls.model_types[0]
    named = ", ".join(architectures or []) or model_type or "none given"
    raise ModelLoadError(
        f"unsupported architecture {named}; supported: {', '.join(supported_architectures())}"
    )
