"""What a model file or folder is, read from headers only: architecture, parameters, quantization, context,
chat template, license (for `ember ls` and `ember show`)."""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError

QUANT_IN_NAME = re.compile(
    r"(?:^|[-_.])((?:I?Q[1-8](?:_[A-Z0-9]{1,4}){0,3})|BF16|F16|FP16|F32|FP32)(?=[-_.]|$)", re.IGNORECASE)
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def quant_from_filename(name: str) -> str | None:
    """`Qwen2.5-0.5B-Instruct-Q4_K_M.gguf` → "Q4_K_M" (upper-cased), None when the name shows none."""
    stem = Path(name).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    found = QUANT_IN_NAME.findall(stem)
    return found[-1].upper() if found else None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name → {dtype, shape, data_offsets})."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelLoadError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_SAFETENSORS_HEADER:
                raise ModelLoadError(f"{path}: safetensors header of {n} bytes")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: malformed safetensors header")
    header.pop("__metadata__", None)
    return header


def safetensors_tensors(paths: list[Path]) -> list[tuple[str, str, int]]:
    """(name, dtype, number of elements) of every tensor in the files."""
    found = []
    for path in paths:
        for name, entry in read_safetensors_header(path).items():
            try:
                n = 1
                for d in entry["shape"]:
                    n *= int(d)
                found.append((name, str(entry["dtype"]), n))
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(f"{path}: malformed entry for tensor {name!r}") from None
    return found


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _license_from_readme(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:20000]
    except OSError:
        return None
    front = re.match(r"^---\s*\n(.*?)\n---", text, re.DOTALL)
    if front:
        lic = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front.group(1), re.MULTILINE)
        if lic:
            return lic.group(1).strip()
    return None


def _license_from_file(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    return line.strip()[:100]
    except OSError:
        return None
    return None


def gguf_details(path: Path) -> dict[str, Any]:
    from ember.formats.gguf import read_header

    summary = read_header(path)
    md = summary.metadata
    template = md.get("tokenizer.chat_template")
    license_ = md.get("general.license")
    return {
        "architecture": summary.architecture,
        "parameters": summary.parameters,
        "quant": summary.quant,
        "context_length": summary.arch_key("context_length"),
        "model_name": md.get("general.name") if isinstance(md.get("general.name"), str) else None,
        "template": template if isinstance(template, str) else None,
        "license": license_ if isinstance(license_, str) else None,
        "weights_bytes": summary.weights_bytes,
    }


def safetensors_details(files: dict[str, Path]) -> dict[str, Any]:
    """`files`: the model's file names → where they are (a folder's files, or store blobs)."""
    config = _read_json(files.get("config.json"))
    tensors = safetensors_tensors([p for n, p in sorted(files.items()) if n.endswith(".safetensors")])
    dtypes = Counter(dtype for _, dtype, _ in tensors)
    dtype = CONFIG_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))
    if dtype is None and dtypes:
        dtype = dtypes.most_common(1)[0][0]
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method") if isinstance(
            config["quantization_config"], dict) else None
        dtype = str(method or "quantized")
    template = None
    if "chat_template.jinja" in files:
        try:
            template = files["chat_template.jinja"].read_text(encoding="utf-8", errors="replace")
        except OSError:
            template = None
    if template is None:
        tpl = _read_json(files.get("tokenizer_config.json")).get("chat_template")
        if isinstance(tpl, str):
            template = tpl
        elif isinstance(tpl, list) and tpl and isinstance(tpl[0], dict):
            template = str(tpl[0].get("template", ""))
    archs = config.get("architectures")
    return {
        "architecture": (archs[0] if isinstance(archs, list) and archs else None) or config.get("model_type"),
        "parameters": sum(n for _, _, n in tensors),
        "quant": dtype,
        "context_length": config.get("max_position_embeddings"),
        "template": template,
        "license": _license_from_readme(files.get("README.md")) or _license_from_file(
            files.get("LICENSE") or files.get("LICENSE.txt") or files.get("LICENSE.md")),
    }


def describe_files(fmt: str, files: dict[str, Path]) -> dict[str, Any]:
    """Details to keep in a store manifest (without the template text)."""
    details = describe_path(next(p for n, p in files.items() if n.lower().endswith(".gguf"))) if fmt == "gguf" \
        else safetensors_details(files)
    return {k: v for k, v in details.items() if k in ("architecture", "parameters", "quant", "context_length",
                                                      "license")}


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


def describe_path(path: Path) -> dict[str, Any]:
    """Details of a GGUF file or a checkpoint folder."""
    if path.is_dir():
        return safetensors_details(folder_files(path))
    details = gguf_details(path)
    if not details.get("license"):
        details["license"] = _license_from_readme(path.parent / "README.md") or _license_from_file(
            path.parent / "LICENSE")
    return details


def format_params(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
