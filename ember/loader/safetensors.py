"""Load a transformers checkpoint (config.json + safetensors, single or sharded) into an ember model.

The model is built on the meta device and each tensor is read from the memory-mapped file straight into
its parameter, so the weights are never held twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ember.config import ModelConfig, config_from_hf, read_config_json
from ember.errors import ModelLoadError
from ember.loader.device import resolve_dtype
from ember.loader.weights import finish_loading, set_weight
from ember.models.decoder import CausalLM
from ember.models.registry import model_class_for


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


def load_safetensors_model(model_dir: Path, dtype, device: torch.device) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    raw = read_config_json(model_dir)
    cls, arch = model_class_for(raw.get("architectures"), raw.get("model_type"))
    config = config_from_hf(raw, arch)
    dtype = resolve_dtype(dtype, device, config.torch_dtype)
    model = cls(config)
    params = dict(model.named_parameters())
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    for name, tensor in model.split_checkpoint_tensor(key, shard.get_tensor(key)):
                        if name == "lm_head.weight" and model.lm_head is None:
                            continue  # tied to the embedding
                        if name not in params:
                            if name.endswith("rotary_emb.inv_freq"):
                                continue  # some exports save this buffer; ember computes it
                            raise ModelLoadError(f"{path.name}: unexpected tensor {name!r} for {arch}")
                        set_weight(model, name, params[name], tensor, dtype, device)
        except SafetensorError as err:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({err})") from None
    finish_loading(model, device)
    return model, config, dtype
