"""EncoderConfig: one normalised description of a BERT-family encoder (an embedding model or a cross-encoder),
from config.json plus sentence-transformers' files, or from GGUF metadata.

`is_encoder_config` / `is_encoder_gguf` tell an encoder checkpoint from a decoder one without loading it: what
decides whether a model gets the embedding engine and the "embedding" capability.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError

# HF `architectures` entries served by ember.models.bert / ember.models.nomic_bert.
BERT_EMBEDDERS = ("BertModel", "RobertaModel", "XLMRobertaModel", "CamembertModel")
BERT_CLASSIFIERS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                    "XLMRobertaForSequenceClassification")
NOMIC_ARCHITECTURES = ("NomicBertModel",)
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "nomic_bert")
# GGUF `general.architecture` values of encoders
ENCODER_GGUF_ARCHITECTURES = ("bert", "nomic-bert")
POOLING_KINDS = ("mean", "cls", "last")
# llama.cpp's LLAMA_POOLING_TYPE_* values (`<arch>.pooling_type`)
GGUF_POOLING = {1: "mean", 2: "cls", 3: "last", 4: "rank"}
MAX_DIM = 1 << 20


@dataclass
class EncoderConfig:
    architecture: str  # "bert" | "nomic-bert"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    # RoBERTa/XLM-R number positions from pad_token_id + 1 (their table has max_position_embeddings + offset
    # rows); BERT, and llama.cpp's trimmed tables, from 0.
    position_offset: int = 0
    # rotary (nomic-bert): the fields ember.layers.rotary.RotaryEmbedding reads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    partial_rotary_factor: float = 1.0
    # What the model is for: embedding (pooling, normalize) or scoring pairs (num_labels)
    pooling: str = "cls"
    normalize: bool = False
    max_seq_length: int = 512  # tokens per input, [CLS]/[SEP] included (sentence-transformers' truncation)
    lowercase: bool = False  # sentence-transformers' do_lower_case: lowercase texts before tokenizing
    num_labels: int | None = None  # set for cross-encoders (sequence classification)
    classifier_dense: bool = False  # a dense + tanh layer before the classifier's output (pooler / RoBERTa head)
    torch_dtype: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "max_position_embeddings",
                     "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= MAX_DIM:
                raise ModelLoadError(f"config: {name}={value!r} is not a positive integer ≤ {MAX_DIM}")
        if not isinstance(self.num_layers, int) or not 0 < self.num_layers <= 1024:
            raise ModelLoadError(f"config: num_hidden_layers={self.num_layers!r} is out of range")
        if self.hidden_size % self.num_heads:
            raise ModelLoadError(f"config: hidden_size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if self.pooling not in POOLING_KINDS:
            raise ModelLoadError(f"unsupported pooling {self.pooling!r} (supported: {', '.join(POOLING_KINDS)})")
        if self.num_labels is not None and self.num_labels != 1:
            raise ModelLoadError(f"a cross-encoder with {self.num_labels} labels is not supported (only 1: relevance)")
        self.max_seq_length = min(self.max_seq_length, self.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @property
    def is_cross_encoder(self) -> bool:
        return self.num_labels is not None


def is_encoder_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json dict describes an encoder ember serves (embedding model or cross-encoder)."""
    architectures = raw.get("architectures") or []
    known = BERT_EMBEDDERS + BERT_CLASSIFIERS + NOMIC_ARCHITECTURES
    return any(a in known for a in architectures) or (not architectures and raw.get("model_type") in ENCODER_MODEL_TYPES)


def is_encoder_gguf(metadata: dict[str, Any]) -> bool:
    """Whether GGUF metadata describes an encoder (`general.architecture` bert or nomic-bert)."""
    return metadata.get("general.architecture") in ENCODER_GGUF_ARCHITECTURES


def is_encoder_path(path: Path) -> bool:
    """Whether a model folder or GGUF file holds an encoder; False for anything unreadable."""
    from ember.formats.gguf import GGUFFile, has_gguf_magic

    try:
        if path.is_dir():
            raw = _read_json(path / "config.json")
            return isinstance(raw, dict) and is_encoder_config(raw)
        if has_gguf_magic(path):
            with GGUFFile(path) as gguf:
                return is_encoder_gguf(gguf.metadata)
    except (ModelLoadError, OSError):
        return False
    return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: not readable JSON ({err})") from None


def sentence_transformers_settings(model_dir: Path) -> dict[str, Any]:
    """Pooling, normalisation and max_seq_length from sentence-transformers' modules.json and its modules'
    configs; {} for a folder without them."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return {}
    modules = _read_json(modules_path)
    settings: dict[str, Any] = {"normalize": False}
    if not isinstance(modules, list):
        raise ModelLoadError(f"{modules_path}: expected a list of modules")
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        sub = model_dir / str(module.get("path", "")) if isinstance(module, dict) else model_dir
        if kind.endswith("Pooling"):
            settings["pooling"] = _pooling_mode(_read_json(sub / "config.json"), sub)
        elif kind.endswith("Normalize"):
            settings["normalize"] = True
        elif kind.endswith("Transformer"):
            st_config = sub / "sentence_bert_config.json"
            if st_config.is_file():
                st_settings = _read_json(st_config)
                length = st_settings.get("max_seq_length")
                if isinstance(length, int) and length > 0:
                    settings["max_seq_length"] = length
                settings["lowercase"] = bool(st_settings.get("do_lower_case", False))
        else:
            raise ModelLoadError(f"{modules_path}: sentence-transformers module {kind!r} is not supported")
    return settings


def _pooling_mode(config: dict[str, Any], where: Path) -> str:
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_lasttoken"):
        return "last"
    mode = config.get("pooling_mode")
    if mode in ("mean", "cls"):
        return mode
    if mode == "lasttoken":
        return "last"
    raise ModelLoadError(f"{where}: unsupported pooling (ember supports mean, cls and last-token pooling)")


def encoder_config_from_hf(raw: dict[str, Any], model_dir: Path) -> EncoderConfig:
    """An EncoderConfig from config.json (BERT, RoBERTa, XLM-R, nomic-bert) and the folder's
    sentence-transformers settings."""
    architectures = raw.get("architectures") or []
    settings = sentence_transformers_settings(model_dir)
    classifier = any(a in BERT_CLASSIFIERS for a in architectures)
    try:
        if any(a in NOMIC_ARCHITECTURES for a in architectures) or raw.get("model_type") == "nomic_bert":
            common = _nomic_fields(raw)
        else:
            roberta = raw.get("model_type") in ("roberta", "xlm-roberta", "camembert")
            offset = int(raw.get("pad_token_id", 1)) + 1 if roberta else 0
            common = dict(
                architecture="bert", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
                num_heads=raw["num_attention_heads"],
                # The usable positions: RoBERTa's table starts after its padding rows.
                max_position_embeddings=raw["max_position_embeddings"] - offset,
                type_vocab_size=raw.get("type_vocab_size", 2), layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=raw.get("hidden_act", "gelu"),
                position_offset=offset,
            )
            if raw.get("position_embedding_type", "absolute") != "absolute":
                raise ModelLoadError(f"position_embedding_type {raw['position_embedding_type']!r} is not supported")
        num_labels = None
        if classifier:
            labels = raw.get("id2label")
            num_labels = int(raw.get("num_labels", len(labels) if isinstance(labels, dict) else 2))
        return EncoderConfig(
            **common,
            pooling=settings.get("pooling", "cls"),
            normalize=settings.get("normalize", False),
            max_seq_length=settings.get("max_seq_length", _default_max_length(model_dir, common)),
            lowercase=settings.get("lowercase", False),
            num_labels=num_labels,
            classifier_dense=classifier,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )
    except KeyError as missing:
        raise ModelLoadError(f"config.json: missing required field {missing}") from None
    except (TypeError, ValueError) as bad:
        raise ModelLoadError(f"config.json: malformed value ({bad})") from None


def _default_max_length(model_dir: Path, fields: dict[str, Any]) -> int:
    """Without sentence_bert_config.json: the model's positions, or the tokenizer's model_max_length when
    smaller (sentence-transformers' rule)."""
    limit = fields["max_position_embeddings"]
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        length = _read_json(tokenizer_config).get("model_max_length")
        if isinstance(length, int) and length > 0:
            limit = min(limit, length)
    return limit


def _nomic_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """nomic-bert's GPT-2-style names; only the variant nomic-embed-text v1/v1.5 uses (post-norm, SwiGLU,
    full rotate-half rotary, no biases), as llama.cpp's converter also requires."""
    expected = {"activation_function": "swiglu", "prenorm": False, "rotary_emb_fraction": 1.0,
                "rotary_emb_interleaved": False, "qkv_proj_bias": False, "mlp_fc1_bias": False,
                "mlp_fc2_bias": False}
    for key, value in expected.items():
        if raw.get(key, value) != value:
            raise ModelLoadError(f"nomic-bert with {key}={raw.get(key)!r} is not supported (expected {value!r})")
    if raw.get("rotary_scaling_factor") is not None:
        raise ModelLoadError("nomic-bert with rotary_scaling_factor is not supported")
    # Trained on 2048 positions whatever n_positions says (llama.cpp's converter uses the same limit).
    context = min(int(raw["n_positions"]), int(raw.get("max_trained_positions", raw["n_positions"])))
    return dict(
        architecture="nomic-bert", vocab_size=raw["vocab_size"], hidden_size=raw["n_embd"],
        intermediate_size=raw["n_inner"], num_layers=raw["n_layer"], num_heads=raw["n_head"],
        max_position_embeddings=context, type_vocab_size=raw.get("type_vocab_size", 2),
        layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-12)), hidden_act="silu",
        rope_theta=float(raw.get("rotary_emb_base", 10000.0)),
    )


def encoder_config_from_gguf(metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> EncoderConfig:
    """An EncoderConfig from a bert / nomic-bert GGUF file (as llama.cpp's converter writes them)."""
    from ember.errors import GGUFError

    arch = metadata.get("general.architecture")

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{name}")
        return value

    embed = tensor_shapes.get("token_embd.weight")
    if embed is None:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    pooling = GGUF_POOLING.get(int(metadata.get(f"{arch}.pooling_type", 2)))
    if pooling is None:
        raise GGUFError(f"GGUF {arch}.pooling_type {metadata.get(f'{arch}.pooling_type')!r} is not supported")
    rank = pooling == "rank"
    types = tensor_shapes.get("token_types.weight")
    context = int(key("context_length"))
    return EncoderConfig(
        architecture=arch, vocab_size=int(embed[0]), hidden_size=int(key("embedding_length")),
        intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=int(key("attention.head_count")), max_position_embeddings=context,
        type_vocab_size=int(types[0]) if types else 1,
        layer_norm_eps=float(key("attention.layer_norm_epsilon", 1e-12)),
        hidden_act="silu" if arch == "nomic-bert" else "gelu",
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        # llama.cpp normalises embeddings itself (its default embd_normalize is L2), as Ollama returns them.
        pooling="cls" if rank else pooling, normalize=not rank, max_seq_length=context,
        num_labels=1 if rank else None, classifier_dense="cls.weight" in tensor_shapes,
    )
