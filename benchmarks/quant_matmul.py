"""Time QuantLinear's forward per GGML type, native kernels against the torch backends and a plain F.linear.

    python benchmarks/quant_matmul.py                      # 2048x2048 and 5632x2048, batch 1, 16 and 512, CPU
    python benchmarks/quant_matmul.py --shapes 5632x2048 --batch 1 --types Q4_K,Q8_0 --threads 2 --matrices 40

The weights are random blocks (finite fp16 scales). Prints the median time per forward and the effective
bandwidth over the weight's stored bytes. Each type is timed on the native backend (ember.kernels, where it
can be built) and on the torch backend QuantLinear takes without it (EMBER_NATIVE_KERNELS=0 at construction).
`--matrices N` cycles over N distinct weights so that they come from DRAM, not from the cache, as in a model.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from ember.kernels.native import library
from ember.quant.ggml import BLOCK_SIZES, SUPPORTED, GGMLType, random_rows, row_bytes
from ember.quant.linear import QuantLinear

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def median_ms(fn, min_time: float, device: torch.device, repeat: int = 10) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < repeat:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x2048,5632x2048", help="comma-separated OUTxIN weight shapes")
    p.add_argument("--batch", default="1,16,512", help="comma-separated batch sizes (rows of x)")
    p.add_argument("--matrices", type=int, default=1, help="distinct weights cycled through per timing")
    block_types = sorted(t.name for t in SUPPORTED if BLOCK_SIZES[t][0] > 1)
    p.add_argument("--types", default=",".join(block_types), help="comma-separated GGML types")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="activation dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per row")
    p.add_argument("--repeat", type=int, default=10, help="at least this many timed calls per row")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    types = [GGMLType[n] for n in args.types.split(",")]
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'shape':>10} {'batch':>5} {'type':>7} {'backend':>8} {'path':>6} {'ms':>8} {'GB/s':>7} {'vs bf16':>8}")

    def row(out_f, in_f, batch, name, backend, path, ms, nbytes, base):
        print(f"{out_f}x{in_f:<5} {batch:>5} {name:>7} {backend:>8} {path:>6} {ms:8.3f} "
              f"{nbytes / ms / 1e6:7.1f} {ms / base:8.2f}", flush=True)

    time_ms = partial(median_ms, min_time=args.min_time, device=device, repeat=args.repeat)

    def layers_for(t, out_f, in_f, native: bool):
        saved = os.environ.get("EMBER_NATIVE_KERNELS")
        os.environ["EMBER_NATIVE_KERNELS"] = "1" if native else "0"
        try:
            return [QuantLinear(random_rows(t, out_f, in_f, seed=i), t, (out_f, in_f), dtype, device)
                    for i in range(args.matrices)]
        finally:
            if saved is None:
                del os.environ["EMBER_NATIVE_KERNELS"]
            else:
                os.environ["EMBER_NATIVE_KERNELS"] = saved

    def cycle(layers, x):
        for layer in layers:
            layer(x)

    for out_f, in_f in shapes:
        w = [(torch.randn(out_f, in_f) * 0.02).to(dtype).to(device) for _ in range(args.matrices)]
        for batch in batches:
            x = torch.randn(batch, in_f, dtype=dtype, device=device)
            base = time_ms(partial(cycle, [partial(F.linear, weight=m) for m in w], x)) / args.matrices
            row(out_f, in_f, batch, args.dtype[:7], "linear", "torch", base, w[0].numel() * w[0].element_size(), base)
            for t in types:
                nbytes = row_bytes(t, in_f) * out_f
                for native in ((True, False) if device.type == "cpu" and library() is not None else (False,)):
                    layers = layers_for(t, out_f, in_f, native)
                    ms = time_ms(partial(cycle, layers, x)) / args.matrices
                    row(out_f, in_f, batch, t.name, layers[0].backend, "native" if native else "torch", ms, nbytes,
                        base)


if __name__ == "__main__":
    main()
