"""Decode and prefill throughput of ember's engine, on a model file or a random model of a known shape.

    python benchmarks/decode_speed.py                          # bundled model
    python benchmarks/decode_speed.py --shape tinyllama-1.1b   # random weights, TinyLlama-1.1B shape
    python benchmarks/decode_speed.py --model path/to/model.gguf --batch 1,4,16

Prints aggregate and per-sequence decode tok/s for each batch size, and prefill tok/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.engine.engine import EngineArgs, LLMEngine
from ember.loader.model import LoadedModel, load_model
from ember.models.registry import model_class_for
from ember.sampling_params import SamplingParams
from ember.tokenizer import load_tokenizer

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "gguf" / "tiny-llama-hf"
SHAPES = {
    # TinyLlama-1.1B: a 1B Llama with the 32000-token SentencePiece vocabulary of the bundled test tokenizer.
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                           num_heads=32, num_kv_heads=4, head_dim=64),
    "llama-3.2-1b-body": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16,
                              num_heads=32, num_kv_heads=8, head_dim=64),
}


def random_model(shape: str, dtype: torch.dtype, tokenizer_dir) -> LoadedModel:
    config = ModelConfig(architecture="llama", max_position_embeddings=4096, rms_norm_eps=1e-5, **SHAPES[shape])
    cls, _ = model_class_for(None, "llama")
    model = cls(config).to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = (torch.ones if "norm" in name else torch.randn)(param.shape, dtype=dtype) * (
                1.0 if "norm" in name else 0.02)
    model.eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    return LoadedModel(shape, tokenizer_dir, "random", model, config, tokenizer, None, dtype,
                       torch.device("cpu"), 0.0)


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Return (prefill tok/s, decode tok/s aggregated over the batch)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.loaded.config.vocab_size
    for i in range(batch):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params)
    start = time.perf_counter()
    first_token_at = None
    generated = 0
    while engine.has_work():
        outputs = engine.step()
        if outputs and first_token_at is None and len(outputs) == batch:
            first_token_at = time.perf_counter()
        generated += sum(len(o.token_ids) for o in outputs)
    end = time.perf_counter()
    prefill = batch * prompt_len / (first_token_at - start)
    decode = (generated - batch) / (end - first_token_at)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or transformers folder (default: bundled)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="use random weights of this shape instead")
    parser.add_argument("--tokenizer", default=str(SHARED_TOKENIZER), help="tokenizer for --shape models")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    if args.shape:
        dtype = getattr(torch, args.dtype)
        loaded = random_model(args.shape, dtype, args.tokenizer)
    else:
        loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    engine = LLMEngine(loaded.name, EngineArgs(max_num_seqs=max(batches), max_batched_tokens=2048,
                                               max_model_len=args.prompt + args.tokens + 8), loaded=loaded)
    run_batch(engine, 1, 16, 4)  # warm-up
    print(f"model {loaded.name} ({loaded.format}, {loaded.dtype}), threads {torch.get_num_threads()}, "
          f"prompt {args.prompt}, new tokens {args.tokens}")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'per seq':>9}")
    for batch in batches:
        prefill, decode = run_batch(engine, batch, args.prompt, args.tokens)
        print(f"{batch:>5} {prefill:>14.1f} {decode:>13.1f} {decode / batch:>9.2f}")


if __name__ == "__main__":
    main()
