"""Write a randomly initialised model of a real 1B shape, for speed comparisons without downloads.

The weights are random (the text is noise), but every matmul, cache and kernel has the real model's size,
so tokens per second are what the real model gives. The tokenizer is the 32000-token SentencePiece one of
`../shared/testdata/gguf/tiny-llama-hf`.

    python benchmarks/make_bench_model.py --shape tinyllama-1.1b --out /tmp/bench-1b
    # the same weights as GGUF for ember and llama.cpp (dev-only, from a llama.cpp checkout):
    python llama.cpp/convert_hf_to_gguf.py /tmp/bench-1b --outtype bf16 --outfile /tmp/bench-1b-bf16.gguf
    llama.cpp/build/bin/llama-quantize /tmp/bench-1b-bf16.gguf /tmp/bench-1b-Q4_K_M.gguf Q4_K_M
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "gguf" / "tiny-llama-hf"
SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, tie_word_embeddings=False),
    "llama-3.2-1b-body": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    args = parser.parse_args()

    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      bos_token_id=1, eos_token_id=2, **SHAPES[args.shape])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters written to {args.out}")


if __name__ == "__main__":
    main()
