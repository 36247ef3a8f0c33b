"""BERT-family encoders (BERT, RoBERTa, XLM-R; nomic-bert in nomic_bert.py): embeddings, post-norm layers of
bidirectional attention and a feed-forward block, and for cross-encoders a classification head on [CLS].

Parameters have ember's own names; `checkpoint_names` maps a transformers checkpoint onto them
(ember.loader.gguf_names does the same for GGUF files).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from ember.encoder_config import EncoderConfig
from ember.layers.bidirectional_attention import BidirectionalAttention, PackedBatch
from ember.layers.mlp import DenseMLP, make_linear
from ember.layers.norm import LayerNorm


def _embedding(rows: int, dim: int) -> nn.Embedding:
    # An explicit meta weight skips the random init (see DecoderModel).
    return nn.Embedding(rows, dim, _weight=torch.empty((rows, dim), device="meta"))


class EncoderEmbeddings(nn.Module):
    def __init__(self, config: EncoderConfig, absolute_positions: bool):
        super().__init__()
        self.word = _embedding(config.vocab_size, config.hidden_size)
        self.token_type = _embedding(config.type_vocab_size, config.hidden_size)
        rows = config.max_position_embeddings + config.position_offset
        self.position = _embedding(rows, config.hidden_size) if absolute_positions else None
        self.position_offset = config.position_offset
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids) + self.token_type(token_type_ids)
        if self.position is not None:
            # Padding sits on the right, so every input's real tokens are at 0..n-1 (+ RoBERTa's offset).
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) + self.position_offset
            x = x + self.position(positions)
        return self.norm(x)


class EncoderLayer(nn.Module):
    """Post-norm: x = norm(x + attention(x)); x = norm(x + mlp(x)), over the packed real tokens [T, hidden]."""

    def __init__(self, config: EncoderConfig, mlp: nn.Module, bias: bool):
        super().__init__()
        self.attn = BidirectionalAttention(config.hidden_size, config.num_heads, bias)
        self.attn_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = mlp
        self.mlp_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x, batch, rotary=None):
        x = self.attn_norm(x + self.attn(x, batch, rotary))
        return self.mlp_norm(x + self.mlp(x))


class ClassificationHead(nn.Module):
    """A cross-encoder's score from the [CLS] state: BERT's pooler (dense + tanh) and classifier, or
    RoBERTa's dense + tanh + out_proj: the same computation under two names."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = make_linear(config.hidden_size, config.hidden_size, True) if config.classifier_dense else None
        self.out = make_linear(config.hidden_size, config.num_labels, True)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            cls_state = torch.tanh(self.dense(cls_state))
        return self.out(cls_state)


# transformers' BERT/RoBERTa names -> ember's (after the "bert."/"roberta." prefix is dropped)
_BERT_LAYER_NAMES = {
    "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj", "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.up_proj", "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_norm",
}
_BERT_NAMES = {
    "embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type", "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "head.dense", "classifier": "head.out",
    "classifier.dense": "head.dense", "classifier.out_proj": "head.out",
}
_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# Tensors of heads ember does not run (masked-LM, next-sentence) and buffers it computes itself.
_UNUSED = re.compile(r"^(cls\.|lm_head\.|embeddings\.position_ids$)")


class BertModel(nn.Module):
    """BERT, RoBERTa and XLM-R (they differ in position numbering and vocabulary only)."""

    model_types = ("bert",)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = EncoderEmbeddings(config, absolute_positions=True)
        self.layers = nn.ModuleList(self.make_layer(config) for _ in range(config.num_layers))
        self.head = ClassificationHead(config) if config.is_cross_encoder else None

    def make_layer(self, config: EncoderConfig) -> EncoderLayer:
        return EncoderLayer(config, DenseMLP(config.hidden_size, config.intermediate_size, config.hidden_act), True)

    def rotary_tables(self, length: int, device, dtype):
        return None  # absolute position embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids, token types and real-token mask (padding on the right) -> hidden states [B, L, H]."""
        batch = PackedBatch.from_mask(mask)
        x = batch.pack(self.embeddings(input_ids, token_type_ids))
        rotary = self.rotary_tables(input_ids.shape[1], input_ids.device, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, rotary)
        return batch.pad(x)

    def fuse_projections(self) -> None:
        for layer in self.layers:
            layer.attn.fuse_projections()

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """A cross-encoder's logits [B, num_labels] from its hidden states."""
        return self.head(hidden[:, 0]).float()

    def checkpoint_names(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """ember's parameter(s) for one transformers tensor; nothing for tensors ember does not use."""
        name = re.sub(r"^(bert|roberta)\.", "", name)
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        base, _, kind = name.rpartition(".")
        match = _BERT_LAYER.match(base)
        if match and match.group(2) in _BERT_LAYER_NAMES:
            yield f"layers.{match.group(1)}.{_BERT_LAYER_NAMES[match.group(2)]}.{kind}", tensor
        elif base.startswith(("pooler.", "classifier")) and self.head is None:
            return  # the pooler of an embedding model: sentence-transformers does not use it
        elif base in _BERT_NAMES:
            yield f"{_BERT_NAMES[base]}.{kind}", tensor
        elif not _UNUSED.match(name):
            yield name, tensor  # unknown: the loader reports it
