"""Build and load the small C kernels in this folder with the system C compiler, through ctypes.

The library is compiled on first use (``-O3 -march=native -fopenmp``, well under a second) into
``$EMBER_CACHE/kernels/`` (default ``~/.cache/ember/kernels/``) under a name that hashes the source, the flags,
the compiler and the CPU, written atomically (temp name, then ``os.replace``) so concurrent processes never load
a half-written file. Without a compiler, when every compile attempt fails, or with ``EMBER_NATIVE_KERNELS=0``,
`library()` returns None (logged once at debug level) and callers keep their torch path.

ctypes releases the GIL for the duration of each call, so other Python threads (the server's event loop) run
while a kernel does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_group.c")
ABI = 1
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=gnu11")
# Tried in order: the first that compiles is used (no -march=native on toolchains that reject it, no OpenMP
# where it is missing -- then the kernel runs on one thread).
FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())
# Batches above this go through the torch path: its dequantize-then-GEMM wins once the weight is reused enough.
MAX_BATCH = 32


def enabled() -> bool:
    return os.environ.get("EMBER_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler: $CC, Python's configured CC, then cc/gcc/clang on PATH."""
    candidates = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for cand in candidates:
        if not cand:
            continue
        path = shutil.which(cand.split()[0])
        if path:
            return path
    return None


def cache_dir() -> Path:
    root = os.environ.get("EMBER_CACHE")
    if root:
        return Path(root).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ember" / "kernels"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cc: str, source: bytes, flags: tuple[str, ...], out_dir: Path) -> Path:
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), platform.machine().encode(),
                                     _cpu_fingerprint().encode(), str(ABI).encode()])).hexdigest()[:24]
    target = out_dir / f"int8_group-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{cc} {' '.join(flags)} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ember_kernels_abi.restype = ctypes.c_int
    if lib.ember_kernels_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.ember_kernels_abi()}, expected {ABI}")
    lib.ember_kernels_simd.restype = ctypes.c_int
    fn = lib.ember_int8_group_matmul
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, p, p, p, i64, i64, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        logger.debug("native kernels unavailable: no C compiler found")
        return None
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        logger.debug("native kernels unavailable: %s", e)
        return None
    errors = []
    for extra in FLAG_SETS:
        flags = BASE_FLAGS + extra
        try:
            lib = _bind(_compile(cc, source, flags, cache_dir()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
            continue
        logger.debug("native kernels loaded (%s, simd=%d)", " ".join(flags), lib.ember_kernels_simd())
        return lib
    logger.debug("native kernels unavailable: %s", " | ".join(errors))
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled by EMBER_NATIVE_KERNELS=0, or it could not be built)."""
    return _load() if enabled() else None


def reset() -> None:
    """Forget the loaded (or failed) library so the next `library()` builds again (tests)."""
    _load.cache_clear()


def int8_group_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
                      ) -> torch.Tensor | None:
    """x float32 [B, K] @ (scale * q (+ offset)).T -> float32 [B, N], or None when the kernel is unavailable or
    does not apply (not CPU, K not a multiple of 32, group not 16 or 32).

    q int8 [N, K]; scale and offset float32 [N, K // G]: every group of G consecutive values of a row of q shares
    one scale (and offset). The weight values are computed exactly as `apply_scales` does (float32 multiply, then
    add), so the result matches ``x @ w.T`` in float32 up to summation order."""
    lib = library()
    if lib is None:
        return None
    n, k = q.shape
    if x.dim() != 2 or x.shape[1] != k or scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] == 0:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}")
    group = k // scale.shape[1]
    if (any(t.device.type != "cpu" for t in (x, q, scale)) or k % 32 or group not in (16, 32)
            or group * scale.shape[1] != k or (offset is not None and offset.shape != scale.shape)):
        return None
    if q.dtype != torch.int8 or scale.dtype != torch.float32 or (offset is not None and offset.dtype != torch.float32):
        raise TypeError("expected int8 q and float32 scale/offset")
    x = x.to(torch.float32).contiguous()
    q, scale = q.contiguous(), scale.contiguous()
    offset = None if offset is None else offset.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] and n:
        rc = lib.ember_int8_group_matmul(x.data_ptr(), x.shape[0], k, q.data_ptr(), scale.data_ptr(),
                                         None if offset is None else offset.data_ptr(), n, group, y.data_ptr(),
                                         torch.get_num_threads())
        if rc:
            return None
    return y
