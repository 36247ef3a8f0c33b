"""`ember bench MODEL` (engine throughput, like llama-bench) and `ember bench serve --url URL` (any
OpenAI-compatible server under load, like `vllm bench serve`), sharing one parser: the first positional
is either a model or the word `serve`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ember.cli.options import add_model_options, engine_args
from ember.errors import EmberError

EXAMPLES = """examples:
  ember bench model.gguf                          pp512 and tg128, 5 repetitions
  ember bench model.gguf -p 128,512 -n 32 -c 1,4,16 -t 8 --output md
  ember bench serve --url http://127.0.0.1:8080 --concurrency 1,4,16 --num-prompts 64
  ember bench serve --url http://127.0.0.1:8080 --model qwen --compare http://127.0.0.1:11434 \\
      --compare-model qwen2.5:7b --goodput ttft:500 tpot:50 --plot serve.png --save-result serve.json
"""


class BenchUsageError(EmberError):
    """`ember bench` options that do not fit together."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError("the request rate must be positive")
    return rate


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "bench", help="benchmark the engine, or any OpenAI-compatible server",
        description="Benchmark ember's engine on MODEL, or (with `serve`) a running OpenAI-compatible server.",
        usage="ember bench [MODEL] [options]\n       ember bench serve --url URL [options]",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default=None, metavar="MODEL|serve",
                        help="GGUF file, model folder or model name (default: the bundled model), or `serve`")
    parser.add_argument("-c", "--concurrency", type=_int_list, default=None,
                        help="sequences decoded together (offline) or requests in flight (serve); "
                             "a comma list sweeps")
    parser.add_argument("--output", choices=["table", "md", "json", "csv"], default="table",
                        help="output format on stdout (progress goes to stderr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")

    offline = parser.add_argument_group("engine (ember bench MODEL)")
    offline.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="prompt sizes, comma list (default 512; 0 skips pp)")
    offline.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="generation sizes, comma list (default 128; 0 skips tg)")
    offline.add_argument("-t", "--threads", type=_int_list, default=None,
                         help="CPU threads, comma list (default: torch's, one per physical core)")
    offline.add_argument("-r", "--repetitions", type=int, default=5, help="timed runs per test (default 5)")
    offline.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each test")
    add_model_options(parser, "the largest -c × the longest test's tokens", threads=False)

    serve = parser.add_argument_group("server (ember bench serve)")
    serve.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8080")
    serve.add_argument("--model", help="model name sent to the server (default: the first it lists)")
    serve.add_argument("--endpoint", default="/v1/completions",
                       help="/v1/completions or /v1/chat/completions")
    serve.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    serve.add_argument("--dataset-path", type=Path, help="ShareGPT-format JSON file")
    serve.add_argument("--num-prompts", type=int, default=100, help="requests per run (default 100)")
    serve.add_argument("--random-input-len", type=int, default=512, help="prompt tokens (default 512)")
    serve.add_argument("--random-output-len", type=int, default=128, help="max_tokens (default 128)")
    serve.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths drawn uniformly within ±ratio of the given lengths")
    serve.add_argument("--sharegpt-output-len", type=int, default=None, help="fix max_tokens for ShareGPT")
    serve.add_argument("--request-rate", type=_rate, default=math.inf, help="Poisson arrivals per second, or inf")
    serve.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    serve.add_argument("--max-seconds", type=float, default=None, help="stop sending new requests after this")
    serve.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    serve.add_argument("--compare", nargs="+", default=[], metavar="URL", help="more servers, same workload")
    serve.add_argument("--compare-model", nargs="+", default=[], metavar="NAME",
                       help="model names for --compare (one for all, or one per URL)")
    serve.add_argument("--no-ignore-eos", action="store_true", help="let replies stop at EOS")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    serve.add_argument("--plot", type=Path, help="write throughput and latency plots to this PNG")
    serve.add_argument("--save-result", type=Path, help="write the full record, per-request timings included")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.target == "serve":
        return _run_serve(args)
    if args.url or args.compare:
        raise BenchUsageError("--url and --compare belong to `ember bench serve`")
    return _run_offline(args)


def _emit(record: dict, fmt: str, table, markdown, to_csv) -> None:
    from rich.console import Console

    from ember.bench.report import to_json

    if fmt == "table":
        Console().print(table(record))
    else:
        sys.stdout.write({"md": markdown, "json": to_json, "csv": to_csv}[fmt](record).rstrip("\n") + "\n")


def _run_offline(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from ember import __version__
    from ember.bench import hardware, offline, report
    from ember.engine.engine import EngineArgs, LLMEngine
    from ember.loader.model import load_model
    from ember.store.resolve import resolve

    if args.repetitions < 1:
        raise BenchUsageError("--repetitions must be at least 1")
    concurrency = args.concurrency or [1]
    if 0 in concurrency:
        raise BenchUsageError("--concurrency values must be positive")
    threads = args.threads or [torch.get_num_threads()]
    if 0 in threads:
        raise BenchUsageError("--threads values must be positive")
    specs = offline.plan(args.n_prompt, args.n_gen, concurrency, threads)
    if not specs:
        raise BenchUsageError("nothing to run: every -p and -n size is 0")
    status = Console(stderr=True)
    resolved = resolve(args.target, allow_paths=True)
    loaded = load_model(resolved.path, dtype=args.dtype, device=args.device, name=resolved.name)
    # The longest sequence is the longest test plus its sampled token: without --kv-memory the engine holds
    # max_num_seqs sequences of max_model_len tokens, so every test's sequences fit at once without preemption.
    # No engine thread count: each test sets its own (offline.run_test).
    longest = max(spec.tokens for spec in specs) + 1
    options = engine_args(args, max_num_seqs=max(concurrency), max_model_len=args.max_model_len or longest)
    engine = LLMEngine(loaded.name, EngineArgs(**options), loaded=loaded)

    def show(result: offline.TestResult) -> None:
        spec = result.spec
        note = f" ({result.preemptions} preemptions: raise --kv-memory)" if result.preemptions else ""
        status.print(f"{spec.name} c={spec.concurrency} t={spec.threads}: "
                     f"{result.mean:.2f} ± {result.sd:.2f} tok/s{note}")

    results = offline.run_tests(engine, specs, args.repetitions, warmup=not args.no_warmup, on_result=show)
    record = {
        "ember_version": __version__, "hardware": hardware.detect().to_dict(),
        "model": offline.describe_model(loaded), "repetitions": args.repetitions, "warmup": not args.no_warmup,
        "engine": options, "results": [r.to_dict() for r in results],
    }
    _emit(record, args.output, report.offline_table, report.offline_markdown, report.offline_csv)
    return 0


def _targets(args: argparse.Namespace):
    from ember.bench.serve import Target, base_url, server_models

    urls = [base_url(u) for u in [args.url, *args.compare]]
    if len(args.compare_model) not in (0, 1, len(args.compare)):
        raise BenchUsageError("give one --compare-model for all --compare URLs, or one per URL")
    names = [args.model] + [
        args.compare_model[0] if len(args.compare_model) == 1 else
        args.compare_model[i] if args.compare_model else args.model
        for i in range(len(args.compare))
    ]
    targets = []
    for url, name in zip(urls, names, strict=True):
        if name is None:
            listed = server_models(url)
            if not listed:
                raise BenchUsageError(f"{url} lists no models at /v1/models: pass --model")
            name = listed[0]
        targets.append(Target(url, name, urlsplit(url).netloc))
    if len({t.label for t in targets}) < len(targets):
        for target in targets:
            target.label = f"{target.label} {target.model}"
    return targets


def _workload(args: argparse.Namespace, count, seed: int):
    from ember.bench import datasets

    if args.dataset == "sharegpt":
        if args.dataset_path is None:
            raise BenchUsageError("--dataset sharegpt needs --dataset-path FILE")
        return datasets.sharegpt_workload(args.dataset_path, args.num_prompts, count,
                                          output_len=args.sharegpt_output_len, seed=seed)
    return datasets.random_workload(args.num_prompts, args.random_input_len, args.random_output_len,
                                    args.random_range_ratio, count, seed=seed)


def _run_serve(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ember import __version__
    from ember.bench import datasets, metrics, report
    from ember.bench.datasets import BenchRequest
    from ember.bench.serve import RunSettings, check_server, run_workload

    if not args.url:
        raise BenchUsageError("`ember bench serve` needs --url")
    if args.num_prompts < 1:
        raise BenchUsageError("--num-prompts must be at least 1")
    if args.concurrency and args.max_concurrency:
        raise BenchUsageError("give --max-concurrency N or a --concurrency sweep, not both")
    levels = args.concurrency or [args.max_concurrency]
    if 0 in levels:
        raise BenchUsageError("--concurrency values must be positive")
    slos = metrics.parse_slos(args.goodput)
    targets = _targets(args)
    settings = RunSettings(endpoint="/" + args.endpoint.lstrip("/"), request_rate=args.request_rate,
                           max_seconds=args.max_seconds, ignore_eos=not args.no_ignore_eos,
                           timeout=args.timeout, seed=args.seed)
    status = Console(stderr=True)
    tokenizer = datasets.ServerTokenizer(targets[0].base_url, targets[0].model)
    try:
        # A fresh workload per concurrency level, the same one for every server: a repeated prompt would be
        # answered from the prefix cache and flatter every level after the first.
        count = tokenizer if tokenizer.available else None
        workloads = [_workload(args, count, args.seed + i) for i in range(len(levels))]
    finally:
        tokenizer.close()
    runs = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=status, disable=args.no_progress or not status.is_terminal)
    with progress:
        for target in targets:
            check_server(target, settings, BenchRequest("Hello", 1, 4))
            for level, workload in zip(levels, workloads, strict=True):
                settings.max_concurrency = level
                task = progress.add_task(f"{target.label} c={level or '∞'}", total=len(workload.requests))
                results, duration = run_workload(target, workload, settings,
                                                 on_done=lambda task=task: progress.advance(task))
                summary = metrics.summarize(results, duration, slos)
                if progress.disable:
                    status.print(f"{target.label} c={level or '∞'}: {summary['completed']} requests, "
                                 f"{summary['output_throughput']:.1f} output tok/s")
                runs.append({
                    "label": target.label, "url": target.base_url, "model": target.model,
                    "max_concurrency": level,
                    "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                    **summary,
                    "requests": [{"prompt_len": r.prompt_len, "output_tokens": r.output_tokens, "ttft": r.ttft,
                                  "e2el": r.latency, "itl": r.itl, "error": r.error} for r in results],
                })
    record = {
        "ember_version": __version__,
        "settings": {
            "dataset": args.dataset if args.dataset == "random" else f"sharegpt:{args.dataset_path}",
            "num_prompts": args.num_prompts, "endpoint": settings.endpoint, "exact_lengths": workloads[0].exact_lengths,
            "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio, "ignore_eos": settings.ignore_eos,
            "max_seconds": args.max_seconds, "goodput": slos, "seed": args.seed,
        },
        "runs": runs,
    }
    if args.save_result:
        args.save_result.write_text(report.to_json(record) + "\n", encoding="utf-8")
    if args.plot:
        from ember.bench.plot import plot_serve

        plot_serve(record, args.plot)
    shown = {**record, "runs": [{k: v for k, v in run.items() if k != "requests"} for run in runs]}
    _emit(shown, args.output, report.serve_table, report.serve_markdown, report.serve_csv)
    return 0
