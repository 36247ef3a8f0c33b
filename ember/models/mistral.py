"""Mistral: Llama's layout with sliding-window attention (window from config.json)."""

from ember.models.decoder import CausalLM


class MistralForCausalLM(CausalLM):
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
