"""Qwen3: per-head RMSNorm on q and k before rotary (ModelConfig.qk_norm), no qkv bias."""

from ember.models.decoder import CausalLM


class Qwen3ForCausalLM(CausalLM):
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
