"""Llama 2, 3 and 3.1+ (rope scaling `llama3`): the plain decoder."""

from ember.models.decoder import CausalLM


class LlamaForCausalLM(CausalLM):
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
