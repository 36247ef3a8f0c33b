"""docs/choosing.md as code: where each quantization of a model fits, how fast it can decode there,
which one to take for a use, and which engine with which settings.

Inputs are plain figures (bytes, bytes/s) so the rules can be checked without the machine they describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.bench.hardware import GB, Hardware

QUANTS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]  # the rows shown, best quality first
# Quality order of the types a file may also come in (by llama-quantize's perplexity figures).
QUALITY = ["F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
           "IQ4_XS", "IQ4_NL", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "IQ3_M", "Q3_K_S", "IQ3_XS", "IQ3_XXS",
           "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
LOWEST_GOOD_QUANT = "Q4_K_M"  # below this, quality drops enough to prefer a smaller model
USES = ("dev", "api", "throughput", "container")
SPEED_TARGET = 10.0  # tokens/s: comfortable reading speed for chat
THROUGHPUT_SEQUENCES = 8  # full-context sequences the KV cache should hold for batch serving
PLACEMENTS = ("gpu", "gpu+ram", "ram")  # fastest first
GPU_BUDGET_SHARE = 0.9  # leave room for the runtime and fragmentation, as vLLM's default does
UNIFIED_GPU_SHARE = 0.75  # Metal's default limit on Apple Silicon
RAM_RESERVE_SHARE, RAM_RESERVE_MIN = 0.10, 2 * GB  # for the OS and everything else running
# ember / llama.cpp on a CPU, the (lowest, highest) ratio measured in docs/benchmarks.md (2026-12-02, 1.1B model,
# Q4_0..Q8_0 and bf16): the CPU advice follows these figures, and must change when they do.
MEASURED_CPU_RATIOS = {
    "prefill pp512": (0.97, 2.38),
    "decode tg128": (0.80, 1.06),
    "serving total tok/s (bench serve, c=1 and 16)": (0.77, 0.88),
    "serving time to first token (lower is better)": (0.63, 0.69),
}


@dataclass
class Budget:
    """Memory a model may use, and how fast each kind reads."""

    gpu_bytes: int
    ram_bytes: int
    gpu_bandwidth: float  # bytes/s
    ram_bandwidth: float
    gpu_vendor: str | None  # "nvidia" | "amd" | "apple" | None
    gpu_count: int = 0

    @property
    def unified(self) -> bool:
        return self.gpu_vendor == "apple"


def budget_for(hw: Hardware, gpu_bandwidth: float, ram_bandwidth: float) -> Budget:
    ram = hw.ram_bytes - max(RAM_RESERVE_MIN, hw.ram_bytes * RAM_RESERVE_SHARE)
    if hw.memory_limit_bytes:
        ram = min(ram, hw.memory_limit_bytes * (1 - RAM_RESERVE_SHARE))
    vendor = hw.gpus[0].vendor if hw.gpus else None
    gpus = [g for g in hw.gpus if g.vendor == vendor]
    share = UNIFIED_GPU_SHARE if vendor == "apple" else GPU_BUDGET_SHARE
    gpu = sum(g.memory_bytes for g in gpus) * share
    return Budget(int(gpu), int(max(ram, 0)), gpu_bandwidth, ram_bandwidth, vendor, len(gpus))


@dataclass
class Option:
    """One quantization of the model on this machine."""

    quant: str
    weights_bytes: int
    kv_bytes: int  # one sequence at the full context
    overhead_bytes: int
    placement: str | None = None  # "gpu" | "gpu+ram" | "ram" | None (does not fit)
    gpu_share: float = 0.0  # fraction of the weights on the GPU
    decode_tokens_per_s: float | None = None  # upper bound from bandwidth
    sequences: int = 0  # full-context sequences the memory left holds
    from_file: bool = False  # weights are the file's real tensor bytes, not an estimate
    kv_cache_dtype: str = "auto"  # ember's --kv-cache-dtype the KV bytes are planned for

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes


def place(option: Option, budget: Budget) -> Option:
    """Fill in where `option` fits best, its bandwidth-bound decode speed and its room for sequences."""
    need = option.total_bytes
    per_token_extra = option.kv_bytes  # the KV cache of the context is read on every step as well
    if budget.gpu_bytes and need <= budget.gpu_bytes:
        option.placement, option.gpu_share = "gpu", 1.0
        seconds = (option.weights_bytes + per_token_extra) / budget.gpu_bandwidth
        room = budget.gpu_bytes
    elif budget.gpu_bytes and not budget.unified and need <= budget.gpu_bytes + budget.ram_bytes:
        # Layer split: KV cache and overhead stay on the GPU, the weights that do not fit go to RAM.
        on_gpu = max(budget.gpu_bytes - option.kv_bytes - option.overhead_bytes, 0)
        option.placement = "gpu+ram"
        option.gpu_share = min(on_gpu / option.weights_bytes, 1.0)
        seconds = ((on_gpu + per_token_extra) / budget.gpu_bandwidth
                   + (option.weights_bytes - on_gpu) / budget.ram_bandwidth)
        room = budget.gpu_bytes + budget.ram_bytes
    elif need <= budget.ram_bytes:
        option.placement = "ram"
        seconds = (option.weights_bytes + per_token_extra) / budget.ram_bandwidth
        room = budget.ram_bytes
    else:
        return option
    option.decode_tokens_per_s = 1 / seconds
    option.sequences = int((room - option.weights_bytes - option.overhead_bytes) // max(option.kv_bytes, 1))
    return option


def quality_rank(quant: str) -> int:
    """0 for the best; types ember does not know rank last."""
    return QUALITY.index(quant) if quant in QUALITY else len(QUALITY)


def choose(options: list[Option], use: str) -> tuple[Option | None, list[str]]:
    """The option docs/choosing.md §3 picks, with the reasons; None when nothing fits."""
    fits = [o for o in options if o.placement]
    if not fits:
        return None, ["no quantization fits: choose a smaller model or a shorter --context"]
    reasons = []
    floor = quality_rank(LOWEST_GOOD_QUANT)
    good = [o for o in fits if quality_rank(o.quant) <= floor]
    if not good:
        good = fits
        reasons.append(f"only quantizations below {LOWEST_GOOD_QUANT} fit: expect a clear loss of quality; "
                       "a smaller model at Q4_K_M is often better")
    best_place = min(PLACEMENTS.index(o.placement) for o in good)
    pool = sorted((o for o in good if PLACEMENTS.index(o.placement) == best_place), key=lambda o: quality_rank(o.quant))

    def enough(o: Option) -> bool:
        if use == "throughput":
            return o.sequences >= THROUGHPUT_SEQUENCES
        return (o.decode_tokens_per_s or 0) >= SPEED_TARGET

    quick = [o for o in pool if enough(o)]
    if quick:
        chosen = quick[0]
        target = (f"room for {THROUGHPUT_SEQUENCES}+ sequences at this context" if use == "throughput"
                  else f"at least {SPEED_TARGET:.0f} tokens/s")
        reasons.append(f"{chosen.quant} is the best quality that fits {PLACE_NAMES[chosen.placement]} with {target}")
    else:
        chosen = max(pool, key=lambda o: (o.sequences, o.decode_tokens_per_s or 0)) if use == "throughput" \
            else pool[-1]
        reasons.append(f"{chosen.quant} is the fastest acceptable quantization that fits {PLACE_NAMES[chosen.placement]}; "
                       "even it falls short of the target, so expect it to feel slow")
    return chosen, reasons


PLACE_NAMES = {"gpu": "the GPU", "gpu+ram": "GPU and RAM together", "ram": "RAM"}


@dataclass
class Advice:
    engine: str
    command: str
    reasons: list[str] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)


def engine_advice(use: str, option: Option, budget: Budget, hw: Hardware, model: str, context: int,
                  num_layers: int, model_file: str | None = None) -> Advice:
    """docs/choosing.md §4 for one chosen option; `model_file` is the user's file when it is that option."""
    threads = hw.physical_cores
    seqs = max(1, min(option.sequences, 64 if use == "throughput" else 4))
    kv_gb = math.ceil(option.kv_bytes * seqs / GB)
    device = {"nvidia": "cuda", "amd": "cuda", "apple": "mps"}.get(budget.gpu_vendor or "", "cpu") \
        if option.placement == "gpu" else "cpu"
    gguf = model_file or f"{model}-{option.quant}.gguf"
    ember_serve = (f"ember serve {gguf} --device {device} --max-model-len {context} "
                   f"--max-num-seqs {seqs} --kv-memory {kv_gb}G"
                   + (f" --kv-cache-dtype {option.kv_cache_dtype}" if option.kv_cache_dtype != "auto" else ""))
    llama_server = f"llama-server -m {gguf} -c {context * seqs} -np {seqs}"
    ember_reason = ("ember serves OpenAI and Ollama clients from one process with continuous batching, "
                    "a paged KV cache and prefix caching, on anything PyTorch runs on")
    measure = "measure before settling: ember bench serve --url A --compare B"

    if option.placement == "gpu+ram":
        layers = max(1, int(num_layers * option.gpu_share))
        return Advice(
            "llama.cpp", f"{llama_server} -ngl {layers} -t {threads}",
            [f"the model needs GPU and RAM together: put about {layers} of {num_layers} layers on the GPU (-ngl)",
             "llama.cpp and Ollama split a model between GPU and RAM; ember and vLLM keep it on one device",
             "each layer left in RAM is read at RAM speed: a smaller quantization that fits the GPU is faster"],
            ["Ollama (offloads layers automatically)"],
        )
    if option.placement == "gpu" and budget.gpu_vendor in ("nvidia", "amd"):
        tp = f" --tensor-parallel-size {budget.gpu_count}" if budget.gpu_count > 1 else ""
        vllm = (f"vllm serve <hf-repo> --max-model-len {context} --gpu-memory-utilization 0.9 "
                f"--max-num-seqs {max(seqs, 16)}{tp}")
        if use in ("throughput", "container"):
            command = vllm if use == "throughput" else (
                "docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface "
                f"vllm/vllm-openai --model <hf-repo> --max-model-len {context}{tp}")
            return Advice("vLLM", command, [
                "the model fits in VRAM: vLLM's paged attention and continuous batching give the most tokens/s "
                "across many requests",
                "give vLLM a safetensors checkpoint (BF16, FP8 on Ada/Hopper, AWQ/GPTQ int4) rather than GGUF",
            ], [f"ember: {ember_serve} ({ember_reason})", measure])
        if use == "api":
            return Advice("llama.cpp", f"{llama_server} -ngl 99", [
                "the whole model fits in VRAM (-ngl 99 puts every layer there)",
                f"{seqs} parallel slots (-np) share one copy of the weights; -c is split among them",
            ], [f"ember: {ember_serve} ({ember_reason})", f"vLLM beyond about 8 concurrent users: {vllm}", measure])
        return Advice("llama.cpp", f"llama-cli -m {gguf} -c {context} -ngl 99", [
            "the whole model fits in VRAM: single-stream decoding runs at GPU memory speed",
        ], ["Ollama or LM Studio for a model library and a GUI",
            f"ember from Python: ember run {gguf} --device {device}", measure])
    if option.placement == "gpu" and budget.unified:
        reasons = ["Apple Silicon: the GPU reads the model from unified memory over Metal"]
        if use == "container":
            reasons.append("Docker on macOS has no GPU access: run natively instead of in a container")
        if use in ("api", "throughput"):
            return Advice("llama.cpp", f"{llama_server} -ngl 99", reasons + [
                f"{seqs} parallel slots (-np) share one copy of the weights"],
                [f"ember: {ember_serve} ({ember_reason})", measure])
        return Advice("llama.cpp", f"llama-cli -m {gguf} -c {context} -ngl 99", reasons,
                      ["Ollama; LM Studio (MLX models)", f"ember from Python: ember run {gguf} --device mps",
                       measure])

    # CPU: memory bandwidth and SIMD kernels decide.
    isa = _isa_note(hw)
    if use in ("throughput", "api"):
        serving, decode = _measured("serving total"), _measured("decode")
        if MEASURED_CPU_RATIOS[serving][1] >= 1.0:
            return Advice("ember", ember_serve, [ember_reason, f"measured {serving}: {_ratio(serving)}", isa],
                          [f"llama.cpp: {llama_server} -t {threads}", measure])
        prefill, first = _measured("prefill"), _measured("first token")
        return Advice("llama.cpp", f"{llama_server} -t {threads}", [
            f"measured on a CPU (docs/benchmarks.md), ember / llama.cpp {serving}: {_ratio(serving)}, "
            f"{decode}: {_ratio(decode)}: llama.cpp still serves more tokens per second",
            f"{seqs} parallel slots (-np) share one copy of the weights; -c is split among them",
            isa,
        ], [f"ember: {ember_serve} ({ember_reason}; measured {prefill} {_ratio(prefill)} and {first} "
            f"{_ratio(first)}: it answers long prompts sooner)", measure])
    if use == "container":
        return Advice("llama.cpp", f"docker run -p 8080:8080 -v /models:/models --memory "
                      f"{math.ceil(option.total_bytes * 1.2 / GB)}g ghcr.io/ggml-org/llama.cpp:server "
                      f"-m /models/{gguf} -c {context} -t {threads}", [
                          "a small static image with CPU kernels for every ISA",
                          "--memory caps the container: the model, KV cache and overhead need "
                          f"{option.total_bytes / GB:.1f} GB, with 20 % headroom",
                          isa,
                      ], ["ember in python:3.12-slim (pip install ember), same --memory", measure])
    return Advice("llama.cpp", f"llama-cli -m {gguf} -c {context} -t {threads}", [
        "single-user decoding on a CPU is memory-bound; llama.cpp has hand-tuned kernels for it",
        isa,
        f"{threads} threads: one per physical core (hyper-threads only contend for memory)",
    ], ["Ollama for a model library", f"ember from Python: ember run {gguf}", measure])


def _measured(prefix: str) -> str:
    return next(k for k in MEASURED_CPU_RATIOS if prefix in k)


def _ratio(name: str) -> str:
    low, high = MEASURED_CPU_RATIOS[name]
    return f"{low:.2f}-{high:.2f}x"


def _isa_note(hw: Hardware) -> str:
    features = set(hw.cpu_features)
    if features & {"AMX", "AMX-INT8"}:
        return "the CPU has AMX tile units: int8/bf16 matmuls are fast, prefill especially"
    if features & {"AVX512-VNNI", "AVX-VNNI"}:
        return "the CPU has VNNI int8 dot products: quantized matmuls run well"
    if "AVX-512" in features:
        return "the CPU has AVX-512"
    if "I8MM" in features or "DOTPROD" in features:
        return "the CPU has ARM int8 dot products (DOTPROD/I8MM): quantized matmuls run well"
    if "AVX2" in features:
        return "the CPU has AVX2 but no int8 dot-product extensions: prompt processing will be slow"
    return "the CPU lacks AVX2/NEON: expect slow matmuls"
