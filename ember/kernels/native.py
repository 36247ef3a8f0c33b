"""Build and load the C kernels of this folder (ggml_matmul.c, attention.c, causal_attention.c,
decode_layers.c, lora.c, pool.c) for this CPU's ISA, called through ctypes.

The ISA comes from the CPU's flags at run time (`isa()`): ``avx512`` (AVX-512 F/BW/VL + VNNI), ``avx2``
(AVX2 + FMA + F16C), or ``none`` (other CPUs: callers keep their torch path). ``EMBER_ISA=avx2`` forces the
AVX2 build on an AVX-512 machine (tests run both paths); a request the CPU cannot run is refused with a warning.
Each ISA has explicit compiler flags, never ``-march=native``, so the AVX2 build holds no AVX-512 code.

The library is compiled once (``make`` runs ``python -m ember.kernels`` after installing; otherwise at the first
model load, never inside a request) into ``$EMBER_CACHE/kernels/`` (default ``~/.cache/ember/kernels/``) under a
name that hashes the source, the flags and the compiler, written atomically (temp name, then ``os.replace``) so
concurrent processes never load a half-written file. Without a compiler, when the build fails, or with
``EMBER_NATIVE_KERNELS=0``, `library()` returns None and a warning says so once.

ctypes releases the GIL for each call, so the server's event loop runs while a kernel does.
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

from ember.formats.ggml_types import GGMLType

logger = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
SOURCES = ("ggml_matmul.c", "attention.c", "causal_attention.c", "decode_layers.c", "lora.c", "pool.c")
HEADERS = ("common.h",)
# The types ggml_matmul.c multiplies directly (the others stay on the torch path).
NATIVE_TYPES = frozenset({
    GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS,
})
ABI = 7
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-pthread", f"-I{FOLDER}")
ISA_FLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c", "-mtune=native"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
               "-mtune=native"),
}
# cpuinfo flags each ISA needs
ISA_REQUIRES = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
}


def enabled() -> bool:
    return os.environ.get("EMBER_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _detect(requested: str, machine: str, flags: frozenset[str]) -> str:
    if machine.lower() not in ("x86_64", "amd64"):
        return "none"
    best = next((name for name in ("avx512", "avx2") if ISA_REQUIRES[name] <= flags), "none")
    if not requested or requested == "auto":
        return best
    if requested == "none":
        return "none"
    if requested not in ISA_REQUIRES:
        logger.warning("EMBER_ISA=%s is not one of auto, avx512, avx2, none: using %s", requested, best)
        return best
    if not ISA_REQUIRES[requested] <= flags:
        logger.warning("EMBER_ISA=%s: this CPU lacks %s; using %s", requested,
                       " ".join(sorted(ISA_REQUIRES[requested] - flags)), best)
        return best
    return requested


def isa() -> str:
    """The kernel ISA for this process: avx512, avx2 or none (EMBER_ISA overrides the detected one)."""
    return _detect(os.environ.get("EMBER_ISA", "auto").strip().lower(), platform.machine(), cpu_flags())


def bf16_dot(target_isa: str) -> bool:
    """Whether the build for `target_isa` multiplies bf16 weights with AVX512-BF16 dot products (x rounded to
    bf16, as llama.cpp does) rather than widening them to float32."""
    return target_isa == "avx512" and "avx512_bf16" in cpu_flags()


def compiler() -> str | None:
    """The C compiler: $CC, Python's configured CC, then cc/gcc/clang on PATH."""
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cand.split()[0]) if cand else None
        if path:
            return path
    return None


def cache_dir() -> Path:
    root = os.environ.get("EMBER_CACHE")
    if root:
        return Path(root).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ember" / "kernels"


def _compile(cc: str, source: bytes, flags: tuple[str, ...], out_dir: Path, name: str) -> Path:
    """`source`: the bytes of every source and header, which the cache key hashes."""
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), platform.machine().encode(),
                                     str(ABI).encode()])).hexdigest()[:24]
    target = out_dir / f"{name}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, *(str(FOLDER / f) for f in SOURCES), "-lm"],
                              capture_output=True, text=True, timeout=300)
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
    lib.ember_kernels_isa.restype = ctypes.c_int
    lib.ember_supports.argtypes = [ctypes.c_int]
    lib.ember_supports.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ember_matmul.argtypes = [p, i64, i64, ctypes.c_int, p, p, p, p, p, i64, ctypes.c_int, p, ctypes.c_float,
                                 ctypes.c_int]
    lib.ember_matmul.restype = ctypes.c_int
    f32, i32 = ctypes.c_float, ctypes.c_int
    lib.ember_decode_attention.argtypes = [p, p, p, p, p, p, i64, i32, i32, i32, p, i64, i64, p, i32, f32, f32, i64, i32]
    lib.ember_decode_attention.restype = ctypes.c_int
    lib.ember_causal_attention.argtypes = [p, p, p, p, i64, i64, i32, i32, i32, p, i64, i32, f32, i64, i32]
    lib.ember_causal_attention.restype = ctypes.c_int
    lib.ember_decode_layers.argtypes = [p, i32, i64, i64, i32, i32, i32, i32, p, i64, p, p, p, p, i64, i64, p, i32, i32]
    lib.ember_decode_layers.restype = ctypes.c_int
    lib.ember_get_rows.argtypes = [p, i32, i64, i64, p, i64, p]
    lib.ember_get_rows.restype = ctypes.c_int
    lib.ember_lora.argtypes = [p, i64, p, i64, i64, i64, i64, p, p, i64, i32, p, p, p, p, i32, p, f32, i32]
    lib.ember_lora.restype = ctypes.c_int
    return lib


@functools.cache
def _load(target_isa: str) -> ctypes.CDLL | None:
    if target_isa == "none":
        logger.warning("native CPU kernels need an x86-64 CPU with AVX2, FMA and F16C: using the torch path")
        return None
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found: native CPU kernels are off, quantized models run slower")
        return None
    flags = ISA_FLAGS[target_isa] + (("-mavx512bf16",) if bf16_dot(target_isa) else ())
    try:
        source = b"\0".join((FOLDER / f).read_bytes() for f in SOURCES + HEADERS)
        lib = _bind(_compile(cc, source, BASE_FLAGS + flags, cache_dir(),
                             f"ember_kernels-{target_isa}"))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("native CPU kernels could not be built, using the torch path: %s", e)
        return None
    logger.debug("native kernels loaded (%s, dot isa %d)", target_isa, lib.ember_kernels_isa())
    return lib


def library() -> ctypes.CDLL | None:
    """The kernel library for `isa()`, or None (disabled by EMBER_NATIVE_KERNELS=0, or it could not be built)."""
    return _load(isa()) if enabled() else None
