"""The quantized KV cache (--kv-cache-dtype int8): each token's K (and V) is stored per KV head as int8 values
and one float16 scale, symmetric: scale = max|x| / 127 rounded to float16, q = round(x / scale). Dequantized,
q * scale.

Per token and head, so a new token never rescales what is cached (prefix-cached blocks stay valid) and an
outlier head or token costs only its own precision. The scale is float16 (2 bytes: at head_dim 64 a float32
one would add 3 % to the cache): q is computed with the rounded scale, so the rounding moves no value by more
than half a step. The scales live in their own tensor [slots, kv_heads] beside the cache [slots, kv_heads,
head_dim], block for block, so the block manager and prefix caching see blocks as before. The native decode
kernel (ember/kernels/attention.c) dequantizes rows as it reads them; the torch path dequantizes the blocks it
gathers (`dequantize`).
"""

from __future__ import annotations

import torch

QMAX = 127.0
CACHE_DTYPES = {"int8": torch.int8}  # --kv-cache-dtype -> storage dtype ("auto": the activation dtype)
SCALE_DTYPE = torch.float16
# float16's largest finite value: rows with max|x| above 127 times it (8.3e6) saturate rather than become inf.
SCALE_MAX = torch.finfo(SCALE_DTYPE).max


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, kv_heads, head_dim] -> (int8 values of the same shape, float16 scales [tokens, kv_heads])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / QMAX).clamp_(max=SCALE_MAX).to(SCALE_DTYPE)
    wide = scale.float()
    # An all-zero row (or one whose scale underflows float16) keeps scale 0 and dequantizes to zeros; dividing by
    # 1 instead avoids 0 / 0.
    q = torch.round(x / torch.where(wide > 0, wide, 1.0)[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., head_dim] int8 and scale [...] -> values in `dtype`."""
    return (q.to(torch.float32) * scale.float()[..., None]).to(dtype)
