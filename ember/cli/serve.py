"""`ember serve [MODEL]`: the OpenAI-, Ollama- and llama.cpp-compatible HTTP server."""

from __future__ import annotations

import argparse
import os
import sys

from ember.cli.options import _size, add_model_options, engine_args, existing_adapters
from ember.server.listener import GracefulServer, listen


def add_parser(sub) -> None:
    parser = sub.add_parser("serve", help="serve a model over HTTP (OpenAI, Ollama and llama.cpp APIs)",
                            description="Serve MODEL over HTTP with OpenAI-, Ollama- and llama.cpp-compatible "
                                        "endpoints.")
    parser.add_argument("model", nargs="?", default=None,
                        help="GGUF file, model folder or model name from `ember ls --all` (default: the bundled model)")
    parser.add_argument("--host", default=os.environ.get("EMBER_HOST") or "127.0.0.1",
                        help="address to listen on (default: $EMBER_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=os.environ.get("EMBER_PORT") or "8080",
                        help="port to listen on (default: $EMBER_PORT or 8080)")
    parser.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                             "(default: $EMBER_API_KEY)")
    parser.add_argument("--cors-origins", default="",
                        help="comma-separated origins allowed to call the API from a browser ('*' for any)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait for a slot; more get 503 (default: %(default)s)")
    parser.add_argument("--max-body", type=_size, default=4 * 2**20,
                        help="largest request body, e.g. 4M (default: 4M)")
    parser.add_argument("--max-memory", type=_size, default=None,
                        help="memory the loaded models may use together, e.g. 8G; idle models are unloaded to make "
                             "room (default: 75%% of the available RAM, or 90%% of the free GPU memory)")
    parser.add_argument("--keep-alive", default="5m",
                        help="how long a model stays loaded after its last request: seconds or 30s/5m/1h, "
                             "negative = forever (requests may set their own; default: %(default)s)")
    parser.add_argument("--shutdown-grace", type=float, default=5.0,
                        help="seconds in-flight requests may finish after SIGTERM before they are aborted "
                             "(default: %(default)s)")
    parser.add_argument("--runtime-lora", action="store_true",
                        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read paths on "
                             "this machine)")
    parser.add_argument("--no-webui", dest="webui", action="store_false",
                        help="do not serve the browser chat page at /")
    add_model_options(parser, "a full context, then up to --max-num-seqs 2K-token conversations, "
                              "within --max-memory", max_num_seqs=True,
                      lora="a LoRA adapter of the model (a PEFT folder or a GGUF LoRA file), repeatable; requests "
                           "select it with model=NAME (docs/lora.md)")
    scale = parser.add_argument_group("scale-out on Ray Serve (pip install 'ember[ray]'; see docs/scale-out.md)")
    scale.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="serve N replicas of the model behind one prefix-aware router")
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (e.g. 10.0.0.1:6379) instead of starting a local Ray instance")
    scale.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                       help="CPUs each replica reserves; its engine runs that many threads unless -t says "
                            "(default: %(default)s)")
    scale.add_argument("--replica-gpus", type=float, default=0.0, metavar="G",
                       help="GPUs each replica reserves (default: %(default)s)")
    scale.add_argument("--min-replicas", type=int, default=None, metavar="A",
                       help="autoscale: never fewer replicas than A")
    scale.add_argument("--max-replicas", type=int, default=None, metavar="B",
                       help="autoscale: never more replicas than B (Ray Serve adds replicas when the requests in "
                            "flight exceed --max-num-seqs per replica)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ember.engine.engine import EngineArgs
    from ember.errors import InvalidParameter
    from ember.server.app import create_app, is_loopback
    from ember.server.errors import APIError
    from ember.server.keep_alive import parse_keep_alive
    from ember.server.pool import ModelPool
    from ember.server.state import ServerState, Settings
    from ember.store.info import format_size

    if not 0 <= args.port <= 65535:
        raise InvalidParameter("--port", f"must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise InvalidParameter("--max-queue", f"must be >= 0, got {args.max_queue}")
    settings = Settings(
        host=args.host, port=args.port, api_key=args.api_key,
        cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()],
        max_body_bytes=args.max_body, max_queue=args.max_queue, shutdown_grace=args.shutdown_grace,
        webui=args.webui, runtime_lora=args.runtime_lora)
    if args.max_memory is not None and args.max_memory <= 0:
        raise InvalidParameter("--max-memory", f"must be positive, got {args.max_memory}")
    try:
        keep_alive = parse_keep_alive(args.keep_alive)
    except APIError as err:
        raise InvalidParameter("--keep-alive", err.message.removeprefix("keep_alive: ")) from None
    if not args.api_key and not is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use "
              "the server (set --api-key or $EMBER_API_KEY)", file=sys.stderr, flush=True)
    options = engine_args(args, max_num_seqs=args.max_num_seqs, threads=args.threads)
    EngineArgs(**options)  # a bad value fails here, before a model loads and the server starts
    lora = existing_adapters(options.pop("lora"))  # the served model's alone, not every model the pool loads
    pool_options = {"engine_args": options, "max_memory": args.max_memory, "default_model": args.model,
                    "allow_paths_for_default": True, "keep_alive": keep_alive, "lora": lora}
    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None:
        from ember.cluster.launch import serve_replicas

        return serve_replicas(args, settings, pool_options, args.max_num_seqs)
    sockets = listen(args.host, args.port)
    pool = ModelPool(**pool_options, preload=True)
    server = None

    async def ready():
        import asyncio

        while server is not None and not server.started and not server.should_exit:
            await asyncio.sleep(0.02)
        if server is not None and server.started:
            host = f"[{args.host}]" if ":" in args.host else args.host
            port = args.port
            if port == 0 and server.servers and server.servers[0].sockets:
                port = server.servers[0].sockets[0].getsockname()[1]
            entry = pool.loaded(pool.default_name)
            if entry is not None:
                loaded = entry.engine.engine.loaded
                print(f"loaded {entry.name} from {loaded.path} in {loaded.load_seconds:.1f} s on {entry.device}: "
                      f"{format_size(entry.size)} counted against --max-memory, context {entry.context_length}",
                      flush=True)
            print(f"ember serving {pool.default_name} on http://{host}:{port}", flush=True)
            print(f"  API      http://{host}:{port}/v1 (OpenAI), http://{host}:{port}/api (Ollama)", flush=True)
            if args.webui:
                print(f"  Web UI   http://{host}:{port}/", flush=True)

    def failed(err: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    state = ServerState(settings, on_ready=ready, on_load_error=failed, pool=pool)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_grace + 5, access_log=False,
                            timeout_keep_alive=5)
    server = GracefulServer(config, state.begin_shutdown)
    server.run(sockets=sockets)
    if state.load_error is not None:
        raise state.load_error
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    return 0
