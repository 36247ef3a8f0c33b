"""`ember serve MODEL --replicas N`: ember as a Ray Serve application, on a local Ray instance or an existing
cluster (`--ray-address`), until SIGINT/SIGTERM.

The application is one deployment, `EmberReplica` (N copies, each one model pool with its engine, its CPUs and
GPUs reserved from Ray). Its HTTP entry is this process: uvicorn on --host:--port serves ember.cluster.ingress,
which routes each request with ember.cluster.router and calls the replica it picks through a deployment handle
(Serve's own HTTP proxy is not started: it would add a hop and an actor to every request). With
--min-replicas/--max-replicas, Ray Serve's autoscaler sizes the replica count on the requests each replica has
in flight.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError, InvalidParameter
from ember.server.state import Settings

APP_NAME = "ember"
REPLICA_DEPLOYMENT = "EmberReplica"
INSTALL_HINT = "--replicas needs Ray Serve, which is not installed: pip install 'ember[ray]'"
_QUIET = {"log_level": "WARNING", "enable_access_log": False}
# The gRPC messages between the ingress and the replicas carry whole requests and answers: gRPC's default 4 MiB
# limit would refuse a body near --max-body or a large answer (embeddings of many inputs). Read by Ray Serve when
# it is imported, here and in the replicas.
GRPC_LIMIT = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**30)}


@dataclass
class ReplicaPlan:
    """How many replicas, with what each reserves; `threads`: the engine's CPU threads."""

    replicas: int
    min_replicas: int | None
    max_replicas: int | None
    cpus: float
    gpus: float
    threads: int | None

    @property
    def most(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def deployment_options(self, max_num_seqs: int, shutdown_grace: float = 5.0) -> dict[str, Any]:
        """Ray Serve's options for the replica deployment. A replica takes twice its batch in flight (the rest
        wait at the router, which can still send them elsewhere); the autoscaler aims at one batch each. A
        replica being stopped lets its requests finish for --shutdown-grace seconds, as `ember serve` does."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus,
                                  "runtime_env": {"env_vars": GRPC_LIMIT}},
            "max_ongoing_requests": 2 * max_num_seqs,
            "graceful_shutdown_timeout_s": shutdown_grace,
            "graceful_shutdown_wait_loop_s": 0.5,
            "request_router_config": {"request_router_class": "ember.cluster.router:PrefixAwareRouter",
                                      "request_router_kwargs": {}},
            "logging_config": _QUIET,
        }
        if self.min_replicas is None and self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas if self.min_replicas is not None else 1,
                "max_replicas": self.most, "initial_replicas": self.replicas,
                "target_ongoing_requests": max_num_seqs}
        return options


def plan_replicas(args: argparse.Namespace) -> ReplicaPlan:
    """The replica options of `ember serve`, checked; a bad value raises InvalidParameter."""
    low, high = args.min_replicas, args.max_replicas
    for name, value in (("--replicas", args.replicas), ("--min-replicas", low), ("--max-replicas", high)):
        if value is not None and value < 1:
            raise InvalidParameter(name, f"must be >= 1, got {value}")
    if low is not None and high is not None and low > high:
        raise InvalidParameter("--min-replicas", f"{low} is more than --max-replicas {high}")
    replicas = args.replicas if args.replicas is not None else (low or 1)
    if (low is not None and replicas < low) or (high is not None and replicas > high):
        raise InvalidParameter("--replicas", f"{replicas} is outside [--min-replicas, --max-replicas]")
    if not args.replica_cpus > 0:
        raise InvalidParameter("--replica-cpus", f"must be > 0, got {args.replica_cpus}")
    if not args.replica_gpus >= 0:
        raise InvalidParameter("--replica-gpus", f"must be >= 0, got {args.replica_gpus}")
    # One engine thread per CPU the replica reserves, so replicas sharing a node do not oversubscribe it.
    threads = args.threads if args.threads is not None else max(1, math.floor(args.replica_cpus))
    return ReplicaPlan(replicas, low, high, args.replica_cpus, args.replica_gpus, threads)


def _start_ray(address: str | None, plan: ReplicaPlan):
    for name, value in GRPC_LIMIT.items():
        os.environ.setdefault(name, value)
    if not address:
        # Ray's single-machine mode (its default on macOS and Windows): the node's address is 127.0.0.1, and
        # Ray's own services listen there instead of on every interface. Read when Ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise EmberError(INSTALL_HINT) from None
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return ray
    cpus = os.cpu_count() or 1
    if plan.most * plan.cpus > cpus:
        raise InvalidParameter("--replica-cpus", f"{plan.most} replicas of {plan.cpus:g} CPUs need "
                               f"{plan.most * plan.cpus:g} CPUs; this machine has {cpus}")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    return ray


def _last_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


def serve_replicas(args: argparse.Namespace, settings: Settings, pool_options: dict[str, Any],
                   max_num_seqs: int) -> int:
    plan = plan_replicas(args)
    if not 1 <= args.port <= 65535:
        raise InvalidParameter("--port", f"must be in [1, 65535] with --replicas, got {args.port}")
    model = pool_options.get("default_model")
    if model and os.path.exists(model):  # the replicas' working directory is not ours
        pool_options = {**pool_options, "default_model": os.path.abspath(model)}
    if plan.threads is not None:
        pool_options = {**pool_options,
                        "engine_args": {**pool_options.get("engine_args", {}), "threads": plan.threads}}
    if pool_options.get("max_memory") is None and not args.ray_address:
        # Replicas on this machine share its memory: each gets its part of the usual budget.
        from ember.server.memory_budget import default_max_memory

        pool_options = {**pool_options, "max_memory": default_max_memory(
            pool_options.get("engine_args", {}).get("device", "auto")) // plan.most}
    from ember.server.listener import listen

    sockets = listen(args.host, args.port)  # taken first: a port in use fails at once, before Ray starts
    starting = True
    server = None

    def on_signal(*_) -> None:
        if starting:
            raise KeyboardInterrupt  # during the start: unwind, and take down what was started
        if server is not None:
            server.should_exit = True

    ray = _start_ray(args.ray_address, plan)
    # After ray.init, which installs its own handlers: ours take the application down before Ray.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    taken_down = threading.Event()

    def take_down() -> None:
        if not taken_down.is_set():
            taken_down.set()
            _take_down(settings.shutdown_grace)

    try:
        server = _front(_deploy(args, plan, settings, pool_options, max_num_seqs), settings, take_down)
        starting = False
        server.run(sockets=sockets)  # until SIGINT/SIGTERM, then lets the requests in flight finish
        if not server.started:  # uvicorn logged why (the ingress's startup failed)
            raise EmberError(f"the ingress did not start on {args.host}:{args.port}")
    finally:
        take_down()  # when the server did not get to it (a failed start)
        ray.shutdown()  # the local Ray instance, and Serve on it, end with us
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _front(replicas, settings: Settings, on_shutdown):
    """The HTTP server of the ingress (ember.cluster.ingress) over the replicas' deployment handle."""
    import uvicorn

    from ember.cluster.ingress import EmberIngress
    from ember.server.listener import GracefulServer

    ingress = EmberIngress(replicas, settings.max_body_bytes, on_shutdown)
    config = uvicorn.Config(ingress, lifespan="on", log_level="warning", access_log=False, timeout_keep_alive=5,
                            timeout_graceful_shutdown=settings.shutdown_grace + 5)
    return GracefulServer(config)


def _deploy(args: argparse.Namespace, plan: ReplicaPlan, settings: Settings, pool_options: dict[str, Any],
            max_num_seqs: int):
    """Deploy the replicas; their deployment handle."""
    import ray
    from ray import serve

    from ember.cluster.replica import EmberReplica

    serve.start(proxy_location="Disabled", logging_config=_QUIET)
    replica = serve.deployment(EmberReplica, name=REPLICA_DEPLOYMENT,
                               **plan.deployment_options(max_num_seqs, settings.shutdown_grace))
    try:
        handle = serve.run(replica.bind(settings, pool_options), name=APP_NAME, route_prefix=None, blocking=False)
    except RuntimeError as err:  # a replica could not start (its model did not load): Serve says why
        raise EmberError(f"the replicas did not start: {_last_line(err)}") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    scale = f"{plan.replicas} replicas" if plan.max_replicas is None and plan.min_replicas is None else \
        f"{plan.replicas} replicas, autoscaled within [{plan.min_replicas or 1}, {plan.most}]"
    print(f"ember serving {args.model or 'the default model'} on http://{host}:{args.port} ({scale} on Ray at "
          f"{ray.get_runtime_context().gcs_address})", flush=True)
    return handle


def _take_down(grace: float) -> None:
    """Take the application down (the replicas finish or abort their requests). Bounded: a cluster that stopped
    answering must not keep the command alive."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    def take_down() -> None:
        try:
            serve.delete(APP_NAME)
        except RayServeException:  # Serve did not start: nothing to take down
            pass

    worker = threading.Thread(target=take_down, daemon=True)
    worker.start()
    worker.join(grace + 15)
