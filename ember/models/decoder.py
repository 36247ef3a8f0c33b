"""The decoder-only transformer every supported family is a variant of.

Family files subclass `CausalLM` to name their architectures and to map checkpoint tensors whose layout
differs (fused projections); everything else is switched by fields of `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.layers.attention import Attention, AttentionMetadata
from ember.layers.mlp import GatedMLP, make_linear
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.quant.linear import fuse_linears


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_weight_offset
        self.sandwich = config.sandwich_norm
        self.self_attn = Attention(config, index)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        # Without sandwich norms this is the pre-MLP norm (Llama's naming); with them it follows attention.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
        # Set by fuse_projections when the fused q/k/v and gate/up calls apply the pre-attention and pre-MLP
        # norms themselves (they then take the residual stream as it is).
        self.norms_in_projections = False

    def forward(self, x, cos, sin, rotary, meta):
        if self.norms_in_projections:
            x = x + self.self_attn(x, cos, sin, rotary, meta)
            return x + self.mlp(x)
        attn = self.self_attn(self.input_layernorm(x), cos, sin, rotary, meta)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # An explicit meta weight skips the random init (on meta, init ops import torch._dynamo: 2 s of start-up).
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape, device="meta"))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)
        self.rotary = RotaryEmbedding(config)
        self.embed_scale = config.embed_scale

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            # Gemma rounds the scale to the activation dtype before multiplying.
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        cos, sin = self.rotary.prepare(*self.rotary.cos_sin(positions), x.dtype)
        if meta.native_layers is not None and x.dtype == torch.float32:
            x = x.contiguous()
            meta.native_layers(x, cos.view(x.shape[0], -1), sin.view(x.shape[0], -1), meta.slot_mapping,
                               meta.decode_lens, meta.decode_blocks, meta.decode_start, meta.block_size)
            return self.norm(x)
        for layer in self.layers:
            x = layer(x, cos, sin, self.rotary, meta)
        return self.norm(x)


class CausalLM(nn.Module):
    """Base for every family: `model` (the decoder) and `lm_head`, with HF checkpoint names."""

    architectures: tuple[str, ...] = ()  # HF `architectures` entries this class serves
    model_types: tuple[str, ...] = ()  # HF `model_type` / GGUF `general.architecture` values

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = None if config.tie_word_embeddings else make_linear(config.hidden_size, config.vocab_size)
        self.final_softcap = config.final_logit_softcap

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            logits = torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        logits = logits.float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def fuse_projections(self) -> None:
        """Join each layer's q/k/v and gate/up projections into one native kernel call where their weights allow,
        with the norm before each folded into it (Llama's layer order) and silu(gate) * up formed by down_proj's
        kernel; layers whose weights stay on the torch path keep their modules as they are."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            if not layer.sandwich:  # Llama's order: norm -> attention, norm -> MLP; fold both norms in
                attn.qkv_proj = fuse_linears(qkv, layer.input_layernorm)
                mlp.gate_up_proj = fuse_linears(gate_up, layer.post_attention_layernorm)
                layer.norms_in_projections = attn.qkv_proj is not None and mlp.gate_up_proj is not None
            if not layer.norms_in_projections:
                attn.qkv_proj, mlp.gate_up_proj = fuse_linears(qkv), fuse_linears(gate_up)
            mlp.silu_in_down = (mlp.gate_up_proj is not None and mlp.act is F.silu and mlp.gate_proj.bias is None
                                and mlp.up_proj.bias is None and getattr(mlp.down_proj, "backend", None) == "native"
                                and mlp.down_proj.dtype == torch.float32)

    def split_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Map one checkpoint tensor to this module's parameters; families with fused tensors override."""
        yield name, tensor
