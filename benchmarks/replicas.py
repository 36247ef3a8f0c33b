"""Throughput of `ember serve --replicas` with 1 vs 2 replicas, and the latency the Ray ingress adds.

    python benchmarks/replicas.py                                   # the bundled model
    python benchmarks/replicas.py --model /work/bench/b1-Q4_K_M.gguf --requests 8 --max-tokens 16 --no-overhead
    python benchmarks/replicas.py --overhead-only --samples 400     # only the latency and CPU the ingress adds
    python benchmarks/replicas.py --floor --samples 1000            # Ray Serve's own cost per call, no ember

For each replica count: starts `ember serve MODEL --replicas N --replica-cpus 1 -t 1` (a local Ray instance on
loopback), warms every replica, then sends --requests chat requests (distinct prompts, greedy, ignore_eos,
--max-tokens each) from --concurrency clients and reports generated tokens per second; the ratio 2/1 follows.

Routing overhead (`--overhead-only` skips the throughput runs): a one-token request sent alternately to
`--replicas 1` and to a plain `ember serve` (same model, same thread count) running at the same time, so that
other load on the machine hits both alike; the p50/p90 of the paired differences is what Serve's proxy, the
ingress, the router and the hop to the replica add per request. The ingress's own part comes from its
`Server-Timing: ingress;dur=MS` header (its time from the body read to the response start, less the
replica's). Wall times depend on the machine's load; the CPU time each process spends per request does much
less: it is read from every process of the two servers (Ray's proxy, ingress and replica actors by their
process titles) over the timed requests, less what each spends idle over as long a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model: str | None, *extra: str, timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="ember-bench-")) / "serve.log"
        command = [sys.executable, "-m", "ember.cli.main", "serve", *([model] if model else []), "--host",
                   "127.0.0.1", "--port", str(self.port), "-t", "1", *extra]
        began = time.monotonic()
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - began < timeout:
            if "ember serving" in self.log.read_text():
                break
            if self.process.poll() is not None:
                raise SystemExit(f"ember serve exited: {self.log.read_text()}")
            time.sleep(0.5)
        else:
            self.stop()
            raise SystemExit(f"ember serve did not start within {timeout} s")
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def chat_body(index: int, max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Request {index}: write about the number {index * 7919}."}]}


async def throughput(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(index: int) -> int:
            body = {**chat_body(index, max_tokens), "model": model}
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(one(-i - 1) for i in range(concurrency)))  # warm every replica
        queue = list(range(requests))
        tokens = 0

        async def worker():
            nonlocal tokens
            while queue:
                tokens += await one(queue.pop())

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - began)


# Processes of a `--replicas` server, by what their command line (Ray's process title) contains.
ROLES = (("ProxyActor", "Serve proxy"), ("EmberIngress", "ingress"), ("EmberReplica", "replica"),
         ("ServeReplica:floor", "replica"),
         ("ServeController", "Serve controller"), ("raylet", "raylet"), ("gcs_server", "GCS"))


def role(process: psutil.Process) -> str:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    return next((name for marker, name in ROLES if marker in command), "other Ray")


def cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) spent so far by each role: a plain server's process, a Ray server's actors."""
    spent: dict[str, float] = {}
    for label, pid in roots.items():
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            name = label if process.pid == pid else role(process)
            spent[name] = spent.get(name, 0.0) + times.user + times.system
    return spent


def paired_latencies(via_ray: str, plain: str, model: str, samples: int,
                     roots: dict[str, int]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """One-token requests, alternately to each server: latencies through Ray ("ray"), of the plain server
    ("plain"), the ingress's own part of those through Ray ("ingress"); and the CPU seconds per request pair
    each process role spent on them, less what it spends idle. Then the ingress's own part of requests that
    leave the engine alone (GET /v1/models: "ingress, no engine")."""
    body = {"model": model, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    times: dict[str, list[float]] = {"ray": [], "plain": [], "ingress": [], "ingress, no engine": []}
    with httpx.Client(timeout=60) as client:
        def one(url: str, timed: bool) -> None:
            began = time.perf_counter()
            response = client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
            if timed:
                times["ray" if url == via_ray else "plain"].append(time.perf_counter() - began)
                if "server-timing" in response.headers:
                    times["ingress"].append(float(response.headers["server-timing"].split("dur=")[1]) / 1e3)

        for _ in range(5):  # warm caches and connections
            one(via_ray, False)
            one(plain, False)
        idle_began, idle_before = time.perf_counter(), cpu_seconds(roots)
        time.sleep(3)
        idle_seconds, idle_after = time.perf_counter() - idle_began, cpu_seconds(roots)
        began, before = time.perf_counter(), cpu_seconds(roots)
        for i in range(samples):
            for url in (via_ray, plain) if i % 2 else (plain, via_ray):
                one(url, True)
        seconds, after = time.perf_counter() - began, cpu_seconds(roots)
        for _ in range(samples):
            timing = client.get(f"{via_ray}/v1/models").raise_for_status().headers["server-timing"]
            times["ingress, no engine"].append(float(timing.split("dur=")[1]) / 1e3)
    per_request = {}
    for name in after:
        idle_rate = (idle_after.get(name, 0.0) - idle_before.get(name, 0.0)) / idle_seconds
        per_request[name] = (after[name] - before.get(name, 0.0) - idle_rate * seconds) / samples
    return times, per_request


def percentiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=10)
    return f"p50 {statistics.median(values) * 1e3:.2f} ms, p90 {cuts[-1] * 1e3:.2f} ms"


def transport_floor(samples: int) -> None:
    """Ray Serve's own cost per call, without ember: a deployment that answers at once, called as the ingress
    calls a replica (the same handle options, from a driver's event loop, a ForwardedRequest as argument)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from ember.cluster.forwarding import ForwardedRequest, ResponseStart
    from ember.cluster.ingress import TRANSPORT

    class Echo:
        async def answer(self, request: ForwardedRequest) -> tuple[ResponseStart, bytes]:
            return ResponseStart(200, [(b"content-type", b"application/json")], "echo"), request.body

    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(serve.deployment(Echo, ray_actor_options={"num_cpus": 0}).bind(), name="floor",
                           route_prefix=None)
        body = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'
        request = ForwardedRequest("POST", "/v1/chat/completions", b"", [(b"content-type", b"application/json")],
                                   body, ("127.0.0.1", 1))
        roles = {"driver (the ingress's side)": os.getpid()}  # Ray's processes, the replica's too, are its children

        async def calls() -> tuple[list[float], dict[str, float]]:
            handle._init(_run_router_in_separate_loop=False)
            answer = handle.options(method_name="answer", **TRANSPORT)
            for _ in range(20):
                await answer.remote(request)
            idle_before = cpu_seconds(roles)
            await asyncio.sleep(2)
            idle = {name: (value - idle_before[name]) / 2 for name, value in cpu_seconds(roles).items()}
            times, before, began = [], cpu_seconds(roles), time.perf_counter()
            for _ in range(samples):
                start = time.perf_counter()
                await answer.remote(request)
                times.append(time.perf_counter() - start)
            seconds, after = time.perf_counter() - began, cpu_seconds(roles)
            return times, {name: (after[name] - before[name] - idle[name] * seconds) / samples for name in after}

        times, cpu = asyncio.run(calls())
    finally:
        ray.shutdown()  # the local instance, Serve with it
    print(f"Ray Serve call floor ({samples} calls, load average {os.getloadavg()[0]:.2f}): {percentiles(times)}; "
          "CPU per call, less idle: " + ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in cpu.items()))


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=30, help="requests timed for the routing overhead")
    parser.add_argument("--no-overhead", action="store_true", help="skip the routing-overhead measurement")
    parser.add_argument("--overhead-only", action="store_true", help="only the routing-overhead measurement")
    parser.add_argument("--floor", action="store_true",
                        help="only Ray Serve's own cost per call (a deployment that answers at once), no ember")
    args = parser.parse_args()
    if args.floor:
        transport_floor(args.samples)
        return
    label = args.model or "ember-default (bundled)"
    if args.overhead_only:
        server = Server(args.model, "--replicas", "1", "--replica-cpus", "1")
        try:
            overhead(server, args.model, model_name(server.url), args.samples, label)
        finally:
            server.stop()
        return
    results = {}
    for replicas in (1, 2):
        server = Server(args.model, "--replicas", str(replicas), "--replica-cpus", "1")
        try:
            name = model_name(server.url)
            rate = asyncio.run(throughput(server.url, name, args.requests, args.concurrency, args.max_tokens))
            results[replicas] = rate
            print(f"{label}: {replicas} replica(s): {rate:.1f} generated tokens/s "
                  f"(ready in {server.start_seconds:.0f} s)", flush=True)
            if replicas == 1 and not args.no_overhead:
                overhead(server, args.model, name, args.samples, label)
        finally:
            server.stop()
    print(f"{label}: throughput ratio 2/1 replicas = {results[2] / results[1]:.2f}")


def overhead(ray_server: Server, model: str | None, name: str, samples: int, label: str) -> None:
    plain = Server(model)
    try:
        times, cpu = paired_latencies(ray_server.url, plain.url, name, samples,
                                      {"plain server": plain.process.pid, "ember serve (driver)": ray_server.process.pid})
    finally:
        plain.stop()
    added = [r - p for r, p in zip(times["ray"], times["plain"], strict=True)]
    print(f"{label}: one-token request, {samples} pairs, load average {os.getloadavg()[0]:.2f}:\n"
          f"  plain ember serve      {percentiles(times['plain'])}\n"
          f"  through the Ray ingress {percentiles(times['ray'])}\n"
          f"  paired difference      {percentiles(added)}\n"
          f"  ingress (Server-Timing) {percentiles(times['ingress'])}\n"
          f"  ingress, GET /v1/models {percentiles(times['ingress, no engine'])}\n"
          f"  CPU per request, less idle: " + ", ".join(f"{role} {seconds * 1e3:.2f} ms"
                                                        for role, seconds in sorted(cpu.items())))


if __name__ == "__main__":
    main()
