"""Phi-3 / Phi-3.5: fused qkv and gate_up projections in the checkpoint, longrope scaling."""

from collections.abc import Iterator

import torch

from ember.models.decoder import CausalLM


class Phi3ForCausalLM(CausalLM):
    architectures = ("Phi3ForCausalLM",)
    model_types = ("phi3",)

    def split_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if ".self_attn.qkv_proj." in name:
            config = self.config
            q = config.num_heads * config.head_dim
            kv = config.num_kv_heads * config.head_dim
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True):
                yield name.replace("qkv_proj", part), piece
        elif ".mlp.gate_up_proj." in name:
            gate, up = tensor.chunk(2, dim=0)
            yield name.replace("gate_up_proj", "gate_proj"), gate
            yield name.replace("gate_up_proj", "up_proj"), up
        else:
            yield name, tensor
