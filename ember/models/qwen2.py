"""Qwen2 / Qwen2.5: biases on the q, k and v projections (ModelConfig.qkv_bias)."""

from ember.models.decoder import CausalLM


class Qwen2ForCausalLM(CausalLM):
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
