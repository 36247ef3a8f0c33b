"""Write the bundled model as a GGUF file, as llama.cpp's converter lays out a Llama checkpoint.

The same weights in bf16 (no quantization loss), the byte-level BPE vocabulary as a `gpt2` tokenizer with
the `gpt-2` pre-tokenizer, the ChatML template, and Q/K rows permuted the GGUF way. llama.cpp, Ollama and
ember all run the result; ember's tests check it gives the same greedy tokens as the safetensors folder.

    python scripts/export_default_gguf.py --out ember/assets/ember-default-bf16.gguf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

DEFAULT = Path(__file__).resolve().parents[1] / "ember" / "assets" / "default"
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half head layout -> GGUF's interleaved one (what llama.cpp's converter does)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{LAYER_NAMES[module]}.weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = json.loads((args.model / "config.json").read_text())
    tokenizer = json.loads((args.model / "tokenizer.json").read_text())
    tokenizer_config = json.loads((args.model / "tokenizer_config.json").read_text())

    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name("ember-default")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_rope_freq_base(config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 1e4)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    vocab = tokenizer["model"]["vocab"]
    tokens = [text for text, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    writer.add_chat_template(tokenizer_config["chat_template"])

    for name, tensor in load_file(args.model / "model.safetensors").items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            tensor = permute_rows(tensor, heads)
        if tensor.dim() == 1:  # norms in F32, as llama.cpp's converter writes them
            writer.add_tensor(gguf_name(name), tensor.float().numpy())
        else:
            bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(gguf_name(name), bits, raw_shape=tuple(tensor.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
