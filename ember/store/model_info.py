"""ModelInfo: ONE description of a model, read from its files' headers without loading it (plus, once the server
has loaded it, how long that took). Every listing only renders it: /api/tags, /api/ps, /api/show, /v1/models,
`ember show` and `ember ps`.

- parameters: the sum of the tensor shapes in the file (quantized tensors count their elements, not bytes).
- quantization: GGUF `general.file_type` ("Q4_K_M"), a checkpoint's dtype ("BF16") or quantization method.
- digest: the SHA-256 of the weights file (a checkpoint of several files: of their "name sha256" lines). Files
  already named by their SHA-256 (ember's and Ollama's blobs, the Hugging Face cache's LFS blobs, all verified
  when downloaded) are not read again; others are hashed once and remembered by (path, size, mtime) in
  ``$EMBER_HOME/digests.json``, so a listing does not rehash gigabytes.
- capabilities: "completion" (or "embedding" for encoder models), plus what the chat template shows
  (ember.tokenizer.chat_template.template_capabilities).
- defaults: the sampling defaults the model ships (generation_config.json; GGUF `general.sampling.*`); the Ollama
  endpoints apply them under the request's options, and /api/show reports them as `parameters`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.store.info import describe_path, folder_files, read_json

log = logging.getLogger(__name__)

SHA256_NAME = re.compile(r"^(?:sha256[-:])?([0-9a-f]{64})$")
EMBEDDING_FAMILIES = {"bert", "nomic-bert", "jina-bert-v2", "xlm-roberta", "roberta", "modernbert"}
# generation_config.json key -> SamplingParams field
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty"}
# GGUF general.sampling.* key (llama.cpp's convert writes them from generation_config) -> SamplingParams field
GGUF_SAMPLING = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty", "penalty_last_n": "repetition_window"}

_lock = threading.Lock()
_memory: dict[str, str] = {}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    format: str  # gguf | safetensors
    family: str | None  # "llama", "qwen2": GGUF general.architecture, config.json model_type
    architecture: str | None  # "llama" (GGUF) or "LlamaForCausalLM" (config.json architectures)
    parameters: int | None
    quantization: str | None  # "Q4_K_M", "BF16"
    digest: str  # sha256 hex
    size: int  # bytes of the model's files
    modified: float  # unix seconds
    context_length: int | None
    embedding_length: int | None
    template: str | None
    capabilities: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF scalar keys (arrays: None), for /api/show
    load_seconds: float | None = None  # set when the server has loaded it

    def loaded(self, seconds: float) -> ModelInfo:
        return replace(self, load_seconds=seconds)

    @property
    def is_embedding_model(self) -> bool:
        return "embedding" in self.capabilities and "completion" not in self.capabilities


def describe_model(name: str, path: str | os.PathLike, fmt: str) -> ModelInfo:
    """The ModelInfo of a GGUF file or checkpoint folder (headers only, plus the cached digest)."""
    path = Path(path)
    details = describe_path(path)
    files = folder_files(path) if path.is_dir() else {path.name: path}
    stats = [p.stat() for p in files.values()]
    if fmt == "gguf":
        metadata, family, embedding, defaults = _gguf_extras(path)
        config = {}
        architecture = details.get("architecture")
    else:
        config = read_json(files.get("config.json"))
        family = config.get("model_type") if isinstance(config.get("model_type"), str) else None
        embedding = config.get("hidden_size") if isinstance(config.get("hidden_size"), int) else None
        defaults = _generation_defaults(read_json(files.get("generation_config.json")))
        metadata = {}
        architecture = details.get("architecture")
    family = family or (architecture if isinstance(architecture, str) else None)
    template = details.get("template")
    from ember.encoder_config import ENCODER_GGUF_ARCHITECTURES, is_encoder_config
    from ember.tokenizer.chat_template import template_capabilities

    # Encoders ember serves (embedding models and cross-encoders: ember.encoder_config), and other encoder
    # families it cannot run yet.
    encoder = (is_encoder_config(config) if fmt != "gguf" else (family or "") in ENCODER_GGUF_ARCHITECTURES)
    kind = "embedding" if encoder or (family or "").lower() in EMBEDDING_FAMILIES else "completion"
    return ModelInfo(
        name=name, path=path, format=fmt, family=family, architecture=architecture,
        parameters=details.get("parameters") or None, quantization=details.get("quant"),
        digest=weights_digest(path), size=sum(s.st_size for s in stats),
        modified=max((s.st_mtime for s in stats), default=0.0), context_length=_int(details.get("context_length")),
        embedding_length=embedding, template=template,
        capabilities=(kind, *template_capabilities(template)), defaults=defaults, license=details.get("license"),
        metadata=metadata)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _generation_defaults(config: dict[str, Any]) -> dict[str, Any]:
    # transformers' do_sample=false means greedy whatever the other fields say
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    return {ours: config[key] for key, ours in GENERATION_DEFAULTS.items()
            if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}


def _gguf_extras(path: Path) -> tuple[dict[str, Any], str | None, int | None, dict[str, Any]]:
    from ember.formats.gguf import ArrayInfo, read_header

    header = read_header(path)
    metadata = {k: (None if isinstance(v, ArrayInfo) else v) for k, v in header.metadata.items()}
    metadata["general.parameter_count"] = header.parameters
    defaults = {ours: header.metadata[f"general.sampling.{key}"] for key, ours in GGUF_SAMPLING.items()
                if isinstance(header.metadata.get(f"general.sampling.{key}"), (int, float))}
    return metadata, header.architecture, _int(header.arch_key("embedding_length")), defaults


def gguf_metadata_verbose(path: Path) -> dict[str, Any]:
    """Every GGUF metadata key with its arrays decoded (the vocabulary...), for /api/show with verbose."""
    from ember.formats.gguf import GGUFFile

    with GGUFFile(path, arrays="decode") as f:
        return dict(f.metadata)


# --- the digest -----------------------------------------------------------------------------------------------
def weights_digest(path: Path) -> str:
    """SHA-256 (hex) of a GGUF file, or of a checkpoint's weights (see the module docstring)."""
    if not path.is_dir():
        return file_digest(path)
    return combined_digest({p.name: file_digest(p) for p in path.iterdir()
                            if p.is_file() and p.name.endswith((".safetensors", ".gguf"))})


def combined_digest(weights: dict[str, str]) -> str:
    """The digest of a model from its weights files' (name → sha256 hex): the file's own when there is one."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    import hashlib

    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(weights.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def file_digest(path: Path) -> str:
    real = path.resolve()
    named = SHA256_NAME.match(real.name)
    if named:
        return named.group(1)
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    with _lock:
        if not _memory:
            _memory.update(_load_cache())
        if key in _memory:
            return _memory[key]
    from ember.store.store import hash_file

    digest, _ = hash_file(real)
    with _lock:
        _memory[key] = digest
        _save_cache(_memory)
    return digest


def _cache_path() -> Path:
    return Path(os.environ.get("EMBER_HOME") or Path.home() / ".ember").expanduser() / "digests.json"


def _load_cache() -> dict[str, str]:
    data = read_json(_cache_path())
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _save_cache(entries: dict[str, str]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:  # a read-only home still answers, it just hashes again next time
        log.debug("cannot remember digests in %s: %s", path, err)
