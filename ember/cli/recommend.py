"""`ember recommend [MODEL | --params 70b --family llama]`: what fits this machine, how fast it will decode,
and which engine and settings suit the use (docs/choosing.md, applied)."""

from __future__ import annotations

import argparse
import json

from ember.errors import EmberError
from ember.store.memory import KV_CACHE_DTYPES


class RecommendUsageError(EmberError):
    """`ember recommend` was given no model, or two."""


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "recommend", help="what fits this machine, how fast, and which engine to use",
        description="Detect the hardware, estimate memory and decode speed of a model at every common "
                    "quantization, and recommend an engine and settings (see docs/choosing.md).")
    parser.add_argument("model", nargs="?", default=None,
                        help="any model reference: GGUF file, model folder, store name, ollama/..., hf.co/..., "
                             "local/... or ember-default")
    parser.add_argument("--params", help="model size instead of a file, e.g. 8b, 70b, mini")
    parser.add_argument("--family", help="llama, qwen2.5, mistral, gemma2, phi3 (with --params)")
    parser.add_argument("--context", type=int, default=8192, help="context length to plan the KV cache for")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="plan the KV cache as ember stores it: auto (16-bit) or int8 (half of that)")
    parser.add_argument("--use", choices=["dev", "api", "throughput", "container"], default="dev",
                        help="dev: one user; api: an endpoint for a few; throughput: many/batch; container")
    parser.add_argument("--no-probe", action="store_true", help="take bandwidth from a table, don't measure")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _model_shape(args: argparse.Namespace):
    """(display name, ModelConfig, (the file's quantization, its weight bytes) or None, the model's path or None).

    A model reference goes through ember.store.resolve (the resolver of `ember run` and the server), and its
    figures come from ember.store.memory.estimate_memory (the server's model pool's estimator)."""
    from ember.bench import shapes

    if args.model and args.params:
        raise RecommendUsageError("give a model or --params, not both")
    if args.params:
        _, name, config = shapes.known_shape(args.params, args.family)
        return name, config, None, None
    if not args.model:
        raise RecommendUsageError("give a model (file, folder, store or discovered name) or --params SIZE "
                                  "[--family NAME]")
    from ember.bench.estimates import model_from_reference

    # The file's own weights as ember would hold them on the device `ember run` picks here (auto).
    return model_from_reference(args.model, args.context, device="auto")


def _bandwidths(hw, probe: bool) -> dict[str, tuple[float, str]]:
    from ember.bench import hardware

    result = {"ram": hardware.table_bandwidth(hw, "cpu"), "gpu": hardware.table_bandwidth(hw, "gpu")}
    if not probe:
        return result
    import torch

    result["ram"] = (hardware.probe_bandwidth("cpu"), "measured (tensor copy)")
    if torch.cuda.is_available():
        result["gpu"] = (hardware.probe_bandwidth("cuda"), "measured (tensor copy)")
    elif torch.backends.mps.is_available():
        result["gpu"] = result["ram"] = (hardware.probe_bandwidth("mps"), "measured (tensor copy)")
    return result


def _smaller_models(args: argparse.Namespace, budget, context: int) -> list[str]:
    """When nothing fits: the largest model of the same family that fits at Q4_K_M."""
    from ember.bench import advice, estimates, shapes

    family, _, wanted = shapes.known_shape(args.params, args.family)
    sizes = sorted(shapes.SHAPES[family].items(), key=lambda item: -shapes.parameter_count(item[1][1]))
    for size, (name, config) in sizes:
        if shapes.parameter_count(config) >= shapes.parameter_count(wanted):
            continue
        option = advice.place(estimates.option(config, advice.LOWEST_GOOD_QUANT, context,
                                               kv_cache_dtype=args.kv_cache_dtype), budget)
        if option.placement:
            return [f"{name} at {option.quant} fits ({option.total_bytes / 1e9:.1f} GB, "
                    f"{advice.PLACE_NAMES[option.placement]}, decode ≲ {option.decode_tokens_per_s:.0f} tokens/s): "
                    f"ember recommend --params {size} --family {family}"]
    return []


def run(args: argparse.Namespace) -> int:
    from ember.bench import advice, estimates, hardware
    from ember.bench.shapes import parameter_count

    if args.context < 1:
        raise RecommendUsageError("--context must be positive")
    name, config, own_quant, model_path = _model_shape(args)
    context = min(args.context, config.max_position_embeddings)
    hw = hardware.detect()
    bandwidth = _bandwidths(hw, probe=not args.no_probe)
    budget = advice.budget_for(hw, bandwidth["gpu"][0], bandwidth["ram"][0])
    quants = advice.QUANTS + ([own_quant[0]] if own_quant and own_quant[0] not in advice.QUANTS else [])
    options = [advice.place(estimates.option(config, quant, context, own_quant, args.kv_cache_dtype), budget)
               for quant in quants]
    chosen, reasons = advice.choose(options, args.use)
    notes = []
    if context < args.context:
        notes.append(f"{name} supports {context} tokens of context: planned for that, not {args.context}")
    guide = None
    if chosen:
        same_file = own_quant is not None and chosen.quant == own_quant[0]
        if own_quant and not same_file:
            notes.append(f"this file is {own_quant[0]}; the same model at {chosen.quant} suits better")
        guide = advice.engine_advice(args.use, chosen, budget, hw, name, context, config.num_layers,
                                     model_file=str(model_path) if same_file else None)
    if chosen is None and args.params:
        reasons += _smaller_models(args, budget, context)
    record = {
        "hardware": hw.to_dict(),
        "bandwidth": {kind: {"bytes_per_s": bps, "source": source} for kind, (bps, source) in bandwidth.items()},
        "budget": {"gpu_bytes": budget.gpu_bytes, "ram_bytes": budget.ram_bytes},
        "model": {"name": name, "params": parameter_count(config), "layers": config.num_layers,
                  "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                  "file_quant": own_quant[0] if own_quant else None},
        "context": context, "use": args.use, "notes": notes,
        "options": [{**vars(o), "total_bytes": o.total_bytes} for o in options],
        "choice": chosen.quant if chosen else None, "choice_reasons": reasons,
        "advice": vars(guide) if guide else None,
    }
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    from rich.console import Console

    from ember.bench.recommend_report import render

    render(Console(), record)
    return 0
