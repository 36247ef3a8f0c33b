"""Loading a model for a command, visibly: what is loaded and from where, a progress bar for files over 1 GB
(on a terminal), then how long it took and the memory it holds. Messages go to stderr and only to a terminal,
so stdout stays the model's answer and scripts see nothing but errors."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

LARGE_FILE = 2**30  # bytes: smaller models load in about a second, without a bar


def model_bytes(path: Path) -> int:
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files)


@contextlib.contextmanager
def _progress_bar(size: int, label: str):
    if size < LARGE_FILE or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=size)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _say(text: str) -> None:
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def load_engine(model: str | None, options: dict):
    """An LLMEngine for `model` (None: the bundled model) with EngineArgs `options`, reported on stderr."""
    import psutil
    import torch

    from ember.engine.engine import EngineArgs, LLMEngine
    from ember.loader.model import load_model
    from ember.store.info import format_size
    from ember.store.resolve import resolve

    args = EngineArgs(**options)
    resolved = resolve(model, allow_paths=True)
    size = model_bytes(resolved.path)
    _say(f"loading {resolved.name} from {resolved.path} ({format_size(size)} {resolved.format})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before loading: weight repacking uses them too
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    with _progress_bar(size, f"loading {resolved.name}") as progress:
        loaded = load_model(resolved.path, dtype=args.dtype, device=args.device, name=resolved.name,
                            progress=progress)
    engine = LLMEngine(model, args, loaded=loaded)
    seconds = time.perf_counter() - started
    weights = sum(t.nbytes for t in loaded.model.parameters()) + sum(t.nbytes for t in loaded.model.buffers())
    kv = engine.runner.kv_cache_bytes
    memory = (f"RSS +{format_size(max(process.memory_info().rss - rss_before, 0))}"
              if engine.device.type == "cpu" else f"GPU {format_size(torch.cuda.memory_allocated(engine.device))}"
              if engine.device.type == "cuda" else None)
    parts = [f"weights {format_size(weights)}", f"KV cache {format_size(kv)} ({engine.max_model_len} tokens"
             + (f", {args.kv_cache_dtype})" if args.kv_cache_dtype != "auto" else ")"), memory]
    _say(f"loaded {resolved.name} in {seconds:.1f} s on {engine.device} ({str(loaded.dtype).removeprefix('torch.')}): "
         + ", ".join(p for p in parts if p))
    return engine
