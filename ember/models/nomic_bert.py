"""nomic-bert (nomic-embed-text v1/v1.5): BERT's post-norm layers with rotary positions instead of a position
table, fused bias-free q/k/v, and a SwiGLU feed-forward block (fc11 = up, fc12 = gate, fc2 = down)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from ember.encoder_config import EncoderConfig
from ember.layers.mlp import GatedMLP
from ember.layers.rotary import RotaryEmbedding
from ember.models.bert import BertModel, EncoderEmbeddings, EncoderLayer

_LAYER_NAMES = {"attn.out_proj": "attn.o_proj", "mlp.fc11": "mlp.up_proj", "mlp.fc12": "mlp.gate_proj",
                "mlp.fc2": "mlp.down_proj", "norm1": "attn_norm", "norm2": "mlp_norm"}
_NAMES = {"embeddings.word_embeddings": "embeddings.word", "embeddings.token_type_embeddings": "embeddings.token_type",
          "emb_ln": "embeddings.norm"}
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


class NomicBertModel(BertModel):
    model_types = ("nomic-bert",)

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.embeddings = EncoderEmbeddings(config, absolute_positions=False)
        self.rotary = RotaryEmbedding(config)

    def make_layer(self, config: EncoderConfig) -> EncoderLayer:
        return EncoderLayer(config, GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act), False)

    def rotary_tables(self, length: int, device, dtype):
        cos, sin = self.rotary.prepare(*self.rotary.cos_sin(torch.arange(length, device=device)), dtype)
        return self.rotary, cos, sin

    def checkpoint_names(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        base, _, kind = name.rpartition(".")
        match = _LAYER.match(base)
        if match and match.group(2) == "attn.Wqkv":
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                yield f"layers.{match.group(1)}.attn.{part}.{kind}", piece
        elif match and match.group(2) in _LAYER_NAMES:
            yield f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{kind}", tensor
        elif base in _NAMES:
            yield f"{_NAMES[base]}.{kind}", tensor
        else:
            yield name, tensor  # unknown: the loader reports it
