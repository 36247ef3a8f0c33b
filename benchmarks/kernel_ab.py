"""A/B timing of two versions of the native matmul kernels on a busy machine: both libraries are built from
source (a git revision's ember/kernels/ against the working tree's), then timed alternately, call after call,
so that whatever else the machine runs slows both alike. Prints, per ISA, type and number of rows of x, the
median time per matrix of each version, the median of the per-round ratios (new / old), the ratio of the
fastest rounds (on a busy machine, noise only adds time), and each version's time relative to its 1-row time.

    python benchmarks/kernel_ab.py --old main --isa avx512,avx2 --types Q4_0,Q4_K,Q6_K,Q8_0 --batch 1,2,4,5,8,16

Each round cycles over `--matrices` distinct weights (so that they come from DRAM, as in a model) once per
version, in alternating order. The load average is printed with the results: it says how busy the machine was.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ember.kernels import native
from ember.quant.ggml import GGMLType, random_rows


def _random_weight(t: GGMLType, out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """uint8 rows of a random weight: GGML blocks, or bf16/f16 values for the float types."""
    if t in (GGMLType.BF16, GGMLType.F16):
        dtype = torch.bfloat16 if t == GGMLType.BF16 else torch.float16
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
        return w.to(dtype).view(torch.uint8)
    return random_rows(t, out_f, in_f, seed=seed)


def build(source_dir: Path, isa: str, out_dir: Path, name: str) -> ctypes.CDLL:
    """The kernel library from the C files in `source_dir`, compiled with ember's flags for `isa`."""
    cc = native.compiler()
    if cc is None:
        raise SystemExit("no C compiler")
    flags = native.BASE_FLAGS[:-1] + (f"-I{source_dir}",) + native.ISA_FLAGS[isa]
    flags += ("-mavx512bf16",) if native.bf16_dot(isa) else ()
    target = out_dir / f"{name}-{isa}.so"
    subprocess.run([cc, *flags, "-o", str(target), *(str(source_dir / f) for f in native.SOURCES), "-lm"],
                   check=True)
    return native._bind(target)


def old_sources(rev: str, out_dir: Path) -> Path:
    """ember/kernels/*.c and *.h at git revision `rev`, written to a folder."""
    folder = out_dir / "old"
    folder.mkdir()
    for name in native.SOURCES + native.HEADERS:
        text = subprocess.run(["git", "show", f"{rev}:ember/kernels/{name}"], check=True, capture_output=True,
                              cwd=native.FOLDER).stdout
        (folder / name).write_bytes(text)
    return folder


def timed_call(lib: ctypes.CDLL, weights: list[torch.Tensor], t: GGMLType, x: torch.Tensor, y: torch.Tensor,
               threads: int) -> float:
    """Seconds for one product of x with each weight in turn: with one thread, the CPU time of this thread
    (which the time other processes hold the core does not count in), else wall time."""
    batch, k = x.shape
    clock = time.thread_time if threads == 1 else time.perf_counter
    start = clock()
    for w in weights:
        ptrs = (ctypes.c_void_p * 1)(w.data_ptr())
        rc = lib.ember_matmul(x.data_ptr(), batch, k, 1, ptrs, (ctypes.c_int * 1)(int(t)),
                              (ctypes.c_int64 * 1)(w.shape[0]), (ctypes.c_int64 * 1)(w.shape[1]), y.data_ptr(),
                              w.shape[0], 0, None, 0.0, threads)
        if rc:
            raise RuntimeError(f"ember_matmul refused {t.name}")
    return clock() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="main", help="git revision of the baseline kernels")
    p.add_argument("--old-dir", help="a folder with the baseline's C files instead of a git revision")
    p.add_argument("--new-dir", default=str(native.FOLDER), help="the folder of the new C files")
    p.add_argument("--isa", default=",".join(n for n in ("avx512", "avx2") if native.ISA_REQUIRES[n]
                                             <= native.cpu_flags()))
    p.add_argument("--types", default="Q4_0,Q4_K,Q6_K,Q8_0")
    p.add_argument("--batch", default="1,2,4,5,8,16")
    p.add_argument("--shape", default="5632x2048", help="OUTxIN of each weight")
    p.add_argument("--matrices", type=int, default=8, help="distinct weights cycled through per timing")
    p.add_argument("--rounds", type=int, default=15, help="alternating old/new timings per row")
    p.add_argument("--threads", type=int, default=1, help="1: thread CPU time (steadier on a busy machine)")
    args = p.parse_args()
    out_f, in_f = (int(v) for v in args.shape.split("x"))
    types = [GGMLType[n] for n in args.types.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        old_dir = Path(args.old_dir) if args.old_dir else old_sources(args.old, tmp_dir)
        print(f"shape {out_f}x{in_f}, {args.matrices} matrices, {args.threads} threads, old = {args.old}, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'isa':>6} {'type':>5} {'rows':>4} {'old ms':>8} {'new ms':>8} {'new/old':>7} {'old x1':>6} "
              f"{'new x1':>6} {'min n/o':>7}")
        for isa in args.isa.split(","):
            libs = {"old": build(old_dir, isa, tmp_dir, "old"), "new": build(Path(args.new_dir), isa, tmp_dir, "new")}
            for t in types:
                weights = [_random_weight(t, out_f, in_f, seed=i) for i in range(args.matrices)]
                one_row: dict[str, float] = {}
                for batch in batches:
                    x = torch.randn(batch, in_f)
                    y = torch.empty(batch, out_f)
                    times: dict[str, list[float]] = {"old": [], "new": []}
                    for name in ("old", "new"):  # warm-up
                        timed_call(libs[name], weights, t, x, y, args.threads)
                    for r in range(args.rounds):
                        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                            time.sleep(0.002)  # the other library's idle workers stop spinning (pool.c SPIN_NS)
                            timed_call(libs[name], weights[:1], t, x, y, args.threads)  # wakes this one's
                            times[name].append(timed_call(libs[name], weights, t, x, y, args.threads))
                    ms = {n: statistics.median(v) * 1e3 / args.matrices for n, v in times.items()}
                    ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"], strict=True))
                    fastest = min(times["new"]) / min(times["old"])
                    if batch == 1:
                        one_row = ms
                    rel = {n: ms[n] / one_row[n] if one_row else float("nan") for n in ms}
                    print(f"{isa:>6} {t.name:>5} {batch:>4} {ms['old']:8.3f} {ms['new']:8.3f} {ratio:7.2f} "
                          f"{rel['old']:6.2f} {rel['new']:6.2f} {fastest:7.2f}", flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
