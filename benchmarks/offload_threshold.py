"""Where tokenizing a request's text inline stops being cheaper than sending it to a worker thread
(ember.server.offload.INLINE_BODY_BYTES), and how long each way holds the event loop.

    python benchmarks/offload_threshold.py --vocab ../shared/testdata/vocab/ggml-vocab-llama-bpe.gguf

For each text size: the median time of `Tokenizer.encode` run inline (all of it holds the loop), and of the same
call through `asyncio.to_thread` (total latency; the loop is free meanwhile), over --repeats runs. The thread hop
itself (an empty job) is printed first: below the size where encoding costs about as much as the hop, inline
is the cheaper choice; above it, the loop should not be held that long anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time

from ember.tokenizer.tokenizer import load_tokenizer

SIZES = (256, 1024, 4096, 16_384, 32_768, 65_536, 262_144)
SAMPLE = "The quick brown fox jumps over the lazy dog; café, naïve, 東京, 12345. "


def median_seconds(job, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        job()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def median_threaded(job, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        await asyncio.to_thread(job)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="ember/assets/ember-default-bf16.gguf")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.vocab)
    hop = await median_threaded(lambda: None, args.repeats)
    print(f"thread hop (empty job): {hop * 1e6:.0f} µs")
    print(f"{'chars':>8} {'inline µs':>10} {'threaded µs':>12}")
    for size in SIZES:
        text = (SAMPLE * (size // len(SAMPLE) + 1))[:size]
        encode = functools.partial(tokenizer.encode, text)
        inline = median_seconds(encode, args.repeats)
        threaded = await median_threaded(encode, args.repeats)
        print(f"{size:>8} {inline * 1e6:>10.0f} {threaded * 1e6:>12.0f}")


if __name__ == "__main__":
    asyncio.run(main())
