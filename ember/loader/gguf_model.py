"""Build an ember model from a GGUF file, keeping quantized weights quantized.

Matrices become `QuantLinear` modules over the file's blocks (Llama's q/k rows reordered back to the
transformers layout), the embedding becomes a `QuantEmbedding` that dequantizes only the looked-up rows,
and small vectors (norms, biases) are read as float tensors.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ember.config import ModelConfig
from ember.encoder_config import encoder_config_from_gguf, is_encoder_gguf
from ember.errors import GGUFError
from ember.formats.gguf import GGUFFile
from ember.kernels import matmul as kernels
from ember.loader.device import resolve_dtype
from ember.loader.gguf_config import config_from_gguf
from ember.loader.gguf_names import ROPE_TENSORS, ember_name, encoder_name, unpermute_rows
from ember.loader.weights import Progress, build_model, finish_loading, set_weight
from ember.models.decoder import CausalLM
from ember.models.registry import encoder_class_for, model_class_for
from ember.quant.embedding import QuantEmbedding
from ember.quant.ggml import FLOAT_TYPES, GGMLType, dequantize, row_bytes
from ember.quant.linear import QuantLinear

_TORCH_FLOATS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def _float_tensor(gguf: GGUFFile, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float tensor in `dtype`; when the file already holds that dtype, a zero-copy view on the map."""
    info = gguf.tensors[name]
    if _TORCH_FLOATS.get(info.ggml_type) == dtype:
        return gguf.raw(name).view(dtype).view(info.shape)
    return dequantize(gguf.raw(name), info.ggml_type, info.shape).to(dtype)


def _rows(gguf: GGUFFile, name: str) -> torch.Tensor:
    """The tensor's raw bytes as [rows, bytes_per_row] (every GGML row is a whole number of blocks)."""
    info = gguf.tensors[name]
    raw = gguf.raw(name)
    return raw.view(info.shape[0], -1)


def load_gguf_model(path: Path, dtype, device: torch.device, progress: Progress | None = None
                    ) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    gguf = GGUFFile(path)
    if is_encoder_gguf(gguf.metadata):
        return load_gguf_encoder(gguf, dtype, device, progress)
    total = sum(info.nbytes for info in gguf.tensors.values())
    done = 0
    shapes = {name: tuple(t.shape) for name, t in gguf.tensors.items()}
    with _metadata_errors(path):
        rope = {name: _float_tensor(gguf, name).tolist() for name in ROPE_TENSORS if name in gguf.tensors}
        config = config_from_gguf(gguf.metadata, shapes, rope)
    cls, _ = model_class_for(None, config.architecture)
    # Activations: float32 on CPU (auto), float16 on GPUs unless asked otherwise.
    dtype = resolve_dtype(dtype, device, "float16")
    model = build_model(cls, config)
    params = dict(model.named_parameters())
    permute_qk = config.architecture == "llama"
    for gguf_name, info in gguf.tensors.items():
        if progress is not None:
            progress(done, total)
            done += info.nbytes
        if gguf_name in ROPE_TENSORS:
            continue
        name = ember_name(gguf_name, config.sandwich_norm)
        if name is None:
            raise GGUFError(f"{path.name}: unexpected tensor {gguf_name!r} for {config.architecture}")
        if len(info.shape) == 1 or (info.ggml_type in FLOAT_TYPES and not _native_matrix(info, device)):
            # vectors, and matrices stored unquantized (F32/F16/BF16 files): plain weights in `dtype`
            tensor = _float_tensor(gguf, gguf_name, dtype)
            if permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor = unpermute_rows(tensor, config.num_heads if "q_proj" in name else config.num_kv_heads,
                                        gguf_name)
            if name.endswith("norm.weight") and config.norm_weight_offset:
                tensor = tensor - config.norm_weight_offset
            for target, piece in model.split_checkpoint_tensor(name, tensor):
                _check(target, params)
                set_weight(model, target, params[target], piece, dtype, device)
            continue
        rows = _rows(gguf, gguf_name)
        if permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            rows = unpermute_rows(rows, heads, gguf_name)
        # Fused matrices (Phi-3) split along rows, which works on quantized rows too.
        for target, piece in model.split_checkpoint_tensor(name, rows):
            module_name = target.removesuffix(".weight")
            _check(target, params)
            expected = tuple(params[target].shape)
            if piece.shape[0] != expected[0] or row_bytes(info.ggml_type, expected[-1]) != piece.shape[-1]:
                raise GGUFError(f"{path.name}: tensor {gguf_name!r} of shape {info.shape} does not match the "
                                f"metadata's {expected}")
            if target == "model.embed_tokens.weight":
                module = QuantEmbedding(piece, info.ggml_type, expected, dtype, device)
            else:
                module = QuantLinear(piece, info.ggml_type, expected, dtype, device)
            _replace_module(model, module_name, module)
            if target == "model.embed_tokens.weight" and config.tie_word_embeddings:
                model.lm_head = QuantLinear(piece, info.ggml_type, expected, dtype, device)
        if not _kept_as_file(info, device) or (permute_qk and name.endswith(("q_proj.weight", "k_proj.weight"))):
            # The blocks were repacked or copied (reordered rows): drop their pages so RSS stays near the file size.
            gguf.release(gguf_name)
    finish_loading(model, device)
    model.fuse_projections()
    return model, config, dtype


def load_gguf_encoder(gguf: GGUFFile, dtype, device: torch.device, progress: Progress | None = None):
    """A bert / nomic-bert GGUF: every tensor dequantized to `dtype` (encoders are small; their matrices run
    as plain torch matmuls over the padded batch)."""
    with _metadata_errors(gguf.path):
        config = encoder_config_from_gguf(gguf.metadata, {name: tuple(t.shape) for name, t in gguf.tensors.items()})
    dtype = resolve_dtype(dtype, device, "float16")
    model = build_model(encoder_class_for(config.architecture), config)
    params = dict(model.named_parameters())
    total, done = sum(info.nbytes for info in gguf.tensors.values()), 0
    for gguf_name, info in gguf.tensors.items():
        if progress is not None:
            progress(done, total)
            done += info.nbytes
        name = encoder_name(gguf_name)
        if name is None:
            raise GGUFError(f"{gguf.path.name}: unexpected tensor {gguf_name!r} for {config.architecture}")
        tensor = _float_tensor(gguf, gguf_name)
        if ".qkv_proj." in name:
            pieces = [(name.replace("qkv_proj", part), chunk)
                      for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True)]
        else:
            pieces = [(name, tensor)]
        for target, piece in pieces:
            _check(target, params)
            set_weight(model, target, params[target], piece, dtype, device)
    finish_loading(model, device)
    model.fuse_projections()
    return model, config, dtype


@contextlib.contextmanager
def _metadata_errors(path: Path):
    """Metadata of the wrong type (a string where a count belongs) or value (0 heads) is a GGUFError."""
    try:
        yield
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as err:
        raise GGUFError(f"{path.name}: malformed model metadata ({type(err).__name__}: {err})") from None


def _kept_as_file(info, device: torch.device) -> bool:
    """Whether the native CPU kernels multiply this tensor as its bytes are in the file (QuantLinear's native
    backend, a view of the map): its pages are then the weights and stay."""
    return device.type == "cpu" and kernels.available(info.ggml_type, info.shape[-1])


def _native_matrix(info, device: torch.device) -> bool:
    """An F16/BF16 matrix the native CPU kernels multiply as it is in the file (no float32 copy)."""
    return info.ggml_type in (GGMLType.F16, GGMLType.BF16) and _kept_as_file(info, device)


def _check(name: str, params: dict) -> None:
    if name not in params:
        raise GGUFError(f"GGUF tensor maps to unknown parameter {name!r}")


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)

