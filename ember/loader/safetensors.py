"""Load a transformers checkpoint (config.json + safetensors, single or sharded) into an ember model.

The model is built on the meta device and each tensor is read from the memory-mapped file straight into
its parameter, so the weights are never held twice. On a CPU with ember's native kernels, bf16/f16 matrices
of linear layers stay in their 16 bits (QuantLinear over their bytes) whatever the activation dtype.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ember.config import ModelConfig, config_from_hf, read_config_json
from ember.encoder_config import encoder_config_from_hf, is_encoder_config
from ember.errors import ModelLoadError
from ember.formats.ggml_types import GGMLType
from ember.kernels import matmul
from ember.loader.device import resolve_dtype
from ember.loader.weights import Progress, build_model, finish_loading, set_weight
from ember.models.decoder import CausalLM
from ember.models.registry import encoder_class_for, model_class_for
from ember.quant.linear import QuantLinear


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{index}: malformed shard index ({err})") from None
        files = []
        for name in names:
            # A bare file name in the folder; the file itself may be a symlink (the HF cache links to blobs/).
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ModelLoadError(f"{index}: shard {name!r} points outside the model folder")
            path = model_dir / name
            if not path.is_file():
                raise ModelLoadError(f"{model_dir}: shard {name} listed in the index is missing")
            files.append(path)
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no .safetensors weights found")
    return files


_HALF_TYPES = {torch.bfloat16: GGMLType.BF16, torch.float16: GGMLType.F16}


def _native_linear(model: CausalLM, name: str, tensor: torch.Tensor, dtype, device: torch.device) -> bool:
    """Put a bf16/f16 linear weight into a native QuantLinear over its bytes; False where that does not apply."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else None
    ggml_type = _HALF_TYPES.get(tensor.dtype)
    if (attr != "weight" or not isinstance(owner, nn.Linear) or ggml_type is None or device.type != "cpu"
            or tensor.dim() != 2 or tuple(tensor.shape) != tuple(owner.weight.shape)
            or not matmul.available(ggml_type, tensor.shape[1])):
        return False
    rows = tensor.contiguous().view(torch.uint8)
    layer = QuantLinear(rows, ggml_type, tuple(tensor.shape), dtype, device)
    if owner.bias is not None and not owner.bias.is_meta:  # a bias read before its weight
        layer.bias = owner.bias
    elif owner.bias is not None:
        layer.bias = nn.Parameter(torch.empty(owner.bias.shape, device="meta"), requires_grad=False)
    parent_name, _, child = owner_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return True


def _checkpoint_tensors(model_dir: Path, progress: Progress | None = None
                        ) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) for every tensor of the checkpoint, read from the memory-mapped files; `progress`
    is told the bytes of the files read so far."""
    files = checkpoint_files(model_dir)
    total, done = sum(path.stat().st_size for path in files), 0
    for path in files:
        if progress is not None:
            progress(done, total)
        done += path.stat().st_size
        try:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    yield path, key, shard.get_tensor(key)
        except SafetensorError as err:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({err})") from None


def load_safetensors_model(model_dir: Path, dtype, device: torch.device, progress: Progress | None = None
                           ) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    raw = read_config_json(model_dir)
    if is_encoder_config(raw):
        return load_safetensors_encoder(model_dir, raw, dtype, device, progress)
    cls, arch = model_class_for(raw.get("architectures"), raw.get("model_type"))
    config = config_from_hf(raw, arch)
    dtype = resolve_dtype(dtype, device, config.torch_dtype)
    model = build_model(cls, config)
    params = dict(model.named_parameters())
    for path, key, checkpoint_tensor in _checkpoint_tensors(model_dir, progress):
        for name, tensor in model.split_checkpoint_tensor(key, checkpoint_tensor):
            if name == "lm_head.weight" and model.lm_head is None:
                continue  # tied to the embedding
            if name not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # some exports save this buffer; ember computes it
                raise ModelLoadError(f"{path.name}: unexpected tensor {name!r} for {arch}")
            if not _native_linear(model, name, tensor, dtype, device):
                set_weight(model, name, params[name], tensor, dtype, device)
    finish_loading(model, device)
    model.fuse_projections()
    return model, config, dtype


def load_safetensors_encoder(model_dir: Path, raw: dict, dtype, device: torch.device,
                             progress: Progress | None = None):
    """A BERT-family encoder (embedding model or cross-encoder): small, so its weights stay plain tensors."""
    config = encoder_config_from_hf(raw, model_dir)
    dtype = resolve_dtype(dtype, device, config.torch_dtype)
    model = build_model(encoder_class_for(config.architecture), config)
    params = dict(model.named_parameters())
    for path, key, checkpoint_tensor in _checkpoint_tensors(model_dir, progress):
        for name, tensor in model.checkpoint_names(key, checkpoint_tensor):
            if name not in params:
                raise ModelLoadError(f"{path.name}: unexpected tensor {key!r} for {config.architecture}")
            set_weight(model, name, params[name], tensor, dtype, device)
    finish_loading(model, device)
    model.fuse_projections()
    return model, config, dtype
