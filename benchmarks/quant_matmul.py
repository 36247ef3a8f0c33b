"""Time QuantLinear's forward per GGML type and backend against a plain bf16 F.linear.

    python benchmarks/quant_matmul.py                      # 2048x2048 and 5632x2048, batch 1 and 16, bf16, CPU
    python benchmarks/quant_matmul.py --shapes 4096x4096 --batch 1 --types Q4_K,Q8_0 --threads 2

The weights are random blocks (finite fp16 scales). Prints the median time per forward and the effective
bandwidth over the weight's stored bytes (for bf16: 2 bytes per value). Layers on the int8 backend are timed
twice: with the native kernel (path "native", ember.kernels) and with it disabled (EMBER_NATIVE_KERNELS=0,
path "torch"); the native row is skipped where the kernel could not be built or the batch is above its limit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from ember import kernels
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
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes (rows of x)")
    block_types = sorted(t.name for t in SUPPORTED if BLOCK_SIZES[t][0] > 1)
    p.add_argument("--types", default=",".join(block_types), help="comma-separated GGML types")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="activation dtype")
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
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f) * 0.02).to(dtype).to(device)
        layers = {t: QuantLinear(random_rows(t, out_f, in_f), t, (out_f, in_f), dtype, device) for t in types}
        for batch in batches:
            x = torch.randn(batch, in_f, dtype=dtype, device=device)
            base = time_ms(partial(F.linear, x, w))
            row(out_f, in_f, batch, args.dtype[:7], "linear", "torch", base, w.numel() * w.element_size(), base)
            for t, layer in layers.items():
                nbytes = row_bytes(t, in_f) * out_f
                native = (layer.backend == "int8" and device.type == "cpu" and batch <= kernels.MAX_BATCH
                          and kernels.library() is not None)
                if native:
                    row(out_f, in_f, batch, t.name, layer.backend, "native", time_ms(partial(layer, x)), nbytes, base)
                saved = os.environ.get("EMBER_NATIVE_KERNELS")
                os.environ["EMBER_NATIVE_KERNELS"] = "0"
                try:
                    ms = time_ms(partial(layer, x))
                finally:
                    if saved is None:
                        del os.environ["EMBER_NATIVE_KERNELS"]
                    else:
                        os.environ["EMBER_NATIVE_KERNELS"] = saved
                row(out_f, in_f, batch, t.name, layer.backend, "torch", ms, nbytes, base)

if __name__ == "__main__":
    main()
