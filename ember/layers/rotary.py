"""Rotary position embeddings with every scaling scheme the supported families use.

Frequencies follow transformers' definitions exactly so logits match it; cos/sin are computed per step
from positions (not a table sized to the context, which would cost hundreds of MB at 128K).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import ModelLoadError


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


class RotaryEmbedding(nn.Module):
    """Applies neox-style (rotate-half) rotary embeddings to q and k for arbitrary positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = int(config.head_dim * config.partial_rotary_factor)
        self.base = config.rope_theta
        self.params = config.rope_scaling
        self.kind = config.rope_type
        self.max_pos = config.max_position_embeddings
        self.original_max = self.params.get("original_max_position_embeddings") or self.max_pos
        self.attention_scaling = 1.0
        inv_freq = _base_inv_freq(self.base, self.dim)
        self.long_inv_freq = None
        if self.kind == "linear":
            inv_freq = inv_freq / self.params["factor"]
        elif self.kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.params)
        elif self.kind == "yarn":
            inv_freq, self.attention_scaling = _yarn(self.base, self.dim, self.params, self.max_pos)
        elif self.kind == "freq_factors":  # GGUF's rope_freqs: frequencies divided by stored factors
            inv_freq = inv_freq / torch.tensor(self.params["factors"], dtype=torch.float32)
        elif self.kind == "longrope":
            factor = self.params.get("factor") or self.max_pos / self.original_max
            attention = self.params.get("attention_factor")
            if attention is None:
                attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
            self.attention_scaling = attention
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            powers = self.base**exponents
            inv_freq = 1.0 / (torch.tensor(self.params["short_factor"], dtype=torch.float32) * powers)
            self.long_inv_freq = 1.0 / (torch.tensor(self.params["long_factor"], dtype=torch.float32) * powers)
        elif self.kind not in ("default", "dynamic"):
            raise ModelLoadError(f"unsupported rope scaling {self.kind!r}")
        self.inv_freq = inv_freq

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        # transformers rescales the base only once a sequence outgrows the original context.
        factor = self.params["factor"]
        base = self.base * ((factor * seq_len / self.original_max) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [T, dim] in float32 for the given absolute positions."""
        inv_freq = self.inv_freq.to(positions.device)
        pos = positions.float()
        if self.kind == "dynamic" and positions.numel():
            seq_len = int(positions.max()) + 1
            if seq_len > self.original_max:
                inv_freq = self._dynamic_inv_freq(seq_len).to(positions.device)
        freqs = pos[:, None] * inv_freq[None, :]
        if self.long_inv_freq is not None:
            long_freqs = pos[:, None] * self.long_inv_freq.to(positions.device)[None, :]
            freqs = torch.where((positions >= self.original_max)[:, None], long_freqs, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def prepare(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin()'s tables as [T, 1, dim] in the activation dtype, sin with rotate-half's sign folded into its
        first half; done once per forward, so that every layer's apply() is a roll, two products and a sum."""
        half = self.dim // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; rotates the first `dim` channels. cos, sin: from prepare().

        rotate_half(r) * sin = cat(-r2, r1) * sin = roll(r, half) * cat(-sin1, sin2): the same products, bit for bit.
        """
        half = self.dim // 2
        if self.dim == x.shape[-1]:
            out = x * cos
            return out.add_(x.roll(half, dims=-1) * sin)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        out = rot * cos
        out.add_(rot.roll(half, dims=-1) * sin)
        return torch.cat((out, rest), dim=-1)
