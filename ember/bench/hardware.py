"""What machine this is: CPU, instruction sets, memory and GPUs, and how fast its memory can be read.

Detection never fails: a tool that is missing or answers badly leaves its field empty, because a
benchmark record or a recommendation with one unknown is still worth more than an error.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field

import psutil

GB = 1e9

# cpuinfo flag -> the name people know; only what matters for LLM kernels (matmul width, int8 dot products).
X86_FEATURES = {
    "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512-BF16",
    "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
}
ARM_FEATURES = {
    "asimd": "NEON", "asimdhp": "FP16", "asimddp": "DOTPROD", "i8mm": "I8MM", "bf16": "BF16",
    "sve": "SVE", "sve2": "SVE2", "sme": "SME",
}
# macOS reports features as sysctl keys set to 1.
SYSCTL_FEATURES = {
    "hw.optional.neon": "NEON", "hw.optional.AdvSIMD": "NEON", "hw.optional.arm.FEAT_FP16": "FP16",
    "hw.optional.arm.FEAT_DotProd": "DOTPROD", "hw.optional.arm.FEAT_I8MM": "I8MM",
    "hw.optional.arm.FEAT_BF16": "BF16", "hw.optional.arm.FEAT_SME": "SME",
    "hw.optional.avx1_0": "AVX", "hw.optional.avx2_0": "AVX2", "hw.optional.fma": "FMA",
    "hw.optional.avx512f": "AVX-512", "hw.optional.avx512vnni": "AVX512-VNNI",
}

# Peak memory bandwidth in GB/s by device-name fragment, most specific first: the table estimate
# used with --no-probe and for GPUs that cannot be probed from here.
GPU_BANDWIDTH_GBS = [
    ("H200", 4800), ("H100 SXM", 3350), ("H100 NVL", 3900), ("H100", 2000), ("A100-SXM4-80GB", 2039),
    ("A100 80GB", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864), ("A6000", 768), ("L4", 300),
    ("A10G", 600), ("A10", 600), ("T4", 320), ("V100", 900),
    ("RTX 5090", 1792), ("RTX 5080", 960), ("RTX 4090", 1008), ("RTX 4080", 717), ("RTX 4070 Ti", 504),
    ("RTX 4070", 504), ("RTX 4060 Ti", 288), ("RTX 4060", 272), ("RTX 3090", 936), ("RTX 3080", 760),
    ("RTX 3070", 448), ("RTX 3060", 360),
    ("MI300X", 5300), ("MI250", 3277), ("MI210", 1638), ("RX 7900 XTX", 960), ("RX 7900 XT", 800),
    ("RX 7800", 624), ("RX 6900", 512), ("RX 6800", 512),
]
APPLE_BANDWIDTH_GBS = [
    ("M4 Max", 546), ("M4 Pro", 273), ("M4", 120), ("M3 Ultra", 819), ("M3 Max", 400), ("M3 Pro", 150),
    ("M3", 100), ("M2 Ultra", 800), ("M2 Max", 400), ("M2 Pro", 200), ("M2", 100), ("M1 Ultra", 800),
    ("M1 Max", 400), ("M1 Pro", 200), ("M1", 68),
]
# Without a probe, a PC's RAM is assumed to be dual-channel DDR4/DDR5: the common desktop and laptop case.
DEFAULT_CPU_BANDWIDTH_GBS = 50


@dataclass
class GPU:
    name: str
    vendor: str  # "nvidia" | "amd" | "apple"
    memory_bytes: int
    free_bytes: int | None = None
    unified: bool = False  # shares system RAM (Apple Silicon)


@dataclass
class Hardware:
    os: str
    arch: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    cpu_features: list[str]
    ram_bytes: int
    ram_available_bytes: int
    gpus: list[GPU] = field(default_factory=list)
    memory_limit_bytes: int | None = None  # a container's cgroup limit, when below the RAM

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gpus = ", ".join(f"{g.name} ({g.memory_bytes / GB:.0f} GB)" for g in self.gpus) or "no GPU"
        return (f"{self.cpu_model}, {self.physical_cores} cores / {self.logical_cores} threads, "
                f"{self.ram_bytes / GB:.0f} GB RAM, {gpus}")


def _run(command: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model_from_cpuinfo(text: str) -> str | None:
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return None


def features_from_cpuinfo(text: str) -> list[str]:
    """ISA features named on the first 'flags' (x86) or 'Features' (ARM) line of /proc/cpuinfo."""
    match = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    if not match:
        return []
    present = set(match.group(2).split())
    table = X86_FEATURES if match.group(1) == "flags" else ARM_FEATURES
    return list(dict.fromkeys(name for flag, name in table.items() if flag in present))


def features_from_sysctl(text: str) -> list[str]:
    """Features from `sysctl hw.optional` output ("key: 1" lines)."""
    values = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    on = {key.strip() for key, value in values.items() if value.strip() == "1"}
    return list(dict.fromkeys(name for key, name in SYSCTL_FEATURES.items() if key in on))


def _cpu() -> tuple[str, list[str]]:
    if platform.system() == "Darwin":
        model = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip()
        return model or platform.processor() or "unknown", features_from_sysctl(_run(["sysctl", "hw.optional"]) or "")
    cpuinfo = _read("/proc/cpuinfo")
    model = cpu_model_from_cpuinfo(cpuinfo) or platform.processor() or platform.machine() or "unknown"
    return model, features_from_cpuinfo(cpuinfo)


def nvidia_from_smi(text: str) -> list[GPU]:
    """Parse `nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            gpus.append(GPU(parts[0], "nvidia", int(float(parts[1]) * 2**20), int(float(parts[2]) * 2**20)))
        except (IndexError, ValueError):
            continue
    return gpus


def amd_from_rocm_smi(text: str) -> list[GPU]:
    """Parse `rocm-smi --showproductname --showmeminfo vram --json`: one object per card."""
    try:
        cards = json.loads(text)
    except json.JSONDecodeError:
        return []
    gpus = []
    for card in cards.values() if isinstance(cards, dict) else []:
        if not isinstance(card, dict):
            continue
        total = next((v for k, v in card.items() if "VRAM Total Memory" in k), None)
        used = next((v for k, v in card.items() if "VRAM Total Used" in k), None)
        name = card.get("Card Series") or card.get("Card series") or card.get("Card model") or "AMD GPU"
        try:
            total_bytes = int(total)
        except (TypeError, ValueError):
            continue
        free = total_bytes - int(used) if str(used or "").isdigit() else None
        gpus.append(GPU(str(name), "amd", total_bytes, free))
    return gpus


def _torch_cuda_gpus() -> list[GPU]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        try:
            free, _ = torch.cuda.mem_get_info(index)
        except RuntimeError:
            free = None
        gpus.append(GPU(props.name, vendor, props.total_memory, free))
    return gpus


def _gpus(cpu_model: str, ram_bytes: int) -> list[GPU]:
    # torch sees only what this build supports; the vendor tools also see cards torch was not built for.
    gpus = _torch_cuda_gpus()
    if not gpus:
        gpus = nvidia_from_smi(_run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free",
                                     "--format=csv,noheader,nounits"]) or "")
    if not any(g.vendor == "amd" for g in gpus):
        gpus += amd_from_rocm_smi(_run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"]) or "")
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        # Metal may use about three quarters of unified memory by default.
        gpus.append(GPU(cpu_model, "apple", ram_bytes, int(ram_bytes * 0.75), unified=True))
    return gpus


def cgroup_memory_limit(ram_bytes: int, root: str = "/sys/fs/cgroup") -> int | None:
    """The container's memory limit (cgroup v2 memory.max, or v1 limit_in_bytes) when it is below the RAM."""
    for path in (f"{root}/memory.max", f"{root}/memory/memory.limit_in_bytes"):
        text = _read(path).strip()
        if text.isdigit() and int(text) < ram_bytes:
            return int(text)
    return None


def detect() -> Hardware:
    model, features = _cpu()
    memory = psutil.virtual_memory()
    return Hardware(
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        cpu_model=model,
        physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_features=features,
        ram_bytes=memory.total,
        ram_available_bytes=memory.available,
        gpus=_gpus(model, memory.total),
        memory_limit_bytes=cgroup_memory_limit(memory.total),
    )


def _lookup(name: str, table: list[tuple[str, int]]) -> int | None:
    return next((gbs for fragment, gbs in table if fragment.lower() in name.lower()), None)


def table_bandwidth(hw: Hardware, device: str) -> tuple[float, str]:
    """(bytes/s, where the figure comes from) for 'cpu' or 'gpu' from the built-in tables."""
    if device == "gpu" and hw.gpus:
        gpu = hw.gpus[0]
        table = APPLE_BANDWIDTH_GBS if gpu.vendor == "apple" else GPU_BANDWIDTH_GBS
        gbs = _lookup(gpu.name, table)
        if gbs:
            return gbs * GB, f"table ({gpu.name})"
        return 300 * GB, f"assumed ({gpu.name} not in the table)"
    apple = _lookup(hw.cpu_model, APPLE_BANDWIDTH_GBS) if "apple" in hw.cpu_model.lower() else None
    if apple:
        return apple * GB, f"table ({hw.cpu_model})"
    return DEFAULT_CPU_BANDWIDTH_GBS * GB, "assumed (dual-channel DDR4/DDR5)"


def probe_bandwidth(device: str = "cpu", size_bytes: int | None = None, repeats: int = 5) -> float:
    """Measured copy bandwidth in bytes/s (read + write) of a large tensor copy, the best of `repeats`.

    The buffer is far larger than any cache so the copy streams from memory, as weight reads during
    decoding do; the best run is taken because interference from other processes only slows it down.
    """
    import torch

    target = torch.device(device)
    if size_bytes is None:
        if target.type == "cpu":
            size_bytes = int(min(512 * 2**20, psutil.virtual_memory().available / 8))
        else:
            size_bytes = 1 << 30
    numel = max(size_bytes // 4, 1 << 16)
    src = torch.ones(numel, dtype=torch.float32, device=target)
    dst = torch.empty_like(src)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        elif target.type == "mps":
            torch.mps.synchronize()

    dst.copy_(src)  # first touch pages the destination in; not timed
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * numel * 4 / best
