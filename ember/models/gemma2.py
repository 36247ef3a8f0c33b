"""Gemma 2: scaled embeddings, (1 + w) norms around both blocks, soft-capped logits, alternating
sliding-window layers, GELU-tanh MLP; all switched on by ModelConfig fields set in config_from_hf."""

from ember.models.decoder import CausalLM


class Gemma2ForCausalLM(CausalLM):
    architectures = ("Gemma2ForCausalLM",)
    model_types = ("gemma2",)
