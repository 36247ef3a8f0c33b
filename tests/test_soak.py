"""Load and faults (docs/reliability.md): a short soak of a real `ember serve` with clients that disconnect
mid-stream, send garbage and probe the limits, then the leak checks and SIGTERM with streams in flight; and a
second server on a port in use fails at once, in one line."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx

from benchmarks.soak import PATHS, SoakConfig, garbage_bodies, soak, summary
from tests.server_helpers import shared_server, start_server


def test_short_soak_checks_leaks_latency_and_sigterm():
    """40 clients for 20 s (25 % disconnecting, 5 % garbage, 5 % at or past the limits) on the bundled model:
    no 5xx or broken stream, every garbage request a 4xx, KV blocks 0 and no extra tasks or threads once idle,
    RSS flat over the second half, p99 not running away; then SIGTERM with streams on every streaming endpoint: all end
    properly and the server exits 0 within its grace period."""
    grace = 2.0
    # A small KV cache: the warm-up writes all of it sooner, and the load preempts now and then.
    proc = start_server(None, "--shutdown-grace", str(grace), "--kv-memory", "16M")
    # p99 factor 3, not the full soak's 1.5: a 5-s window's p99 is its slowest request or so, and on a shared
    # 2-core machine a neighbour's burst alone doubles that; the 10-minute soak's one-minute windows keep 1.5.
    config = SoakConfig(clients=40, duration=20, window=5, sample_every=2, rss_from=10, p99_factor=3.0,
                        sigterm=True, grace=grace)
    try:
        report = asyncio.run(soak(proc.url, proc.process.pid, config, proc.process, log=lambda _: None))
    finally:
        proc.stop()
    text = summary(report)
    assert report.passed, text
    kinds = {o.kind for o in report.outcomes}
    assert kinds == {"good", "disconnect", "garbage", "limit"}, text  # every kind of client really ran
    assert report.sigterm["ended"] == report.sigterm["streams"] == 10, text


def test_garbage_kinds_all_answer_4xx(tmp_path_factory):
    """Each malformed body on each endpoint, one by one: a 4xx with an error body (the soak draws them at
    random, so this makes sure none is left out), and the server still answers afterwards."""
    server = shared_server(tmp_path_factory)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for name, make in garbage_bodies(server.model, 4 * 2**20).items():
                for endpoint, path in PATHS.items():
                    try:
                        r = await client.post(path, **make(endpoint))
                    except (httpx.WriteError, httpx.RemoteProtocolError):
                        assert "over the limit" in name  # the 413 and the close came before the whole body
                        continue
                    assert 400 <= r.status_code < 500 and "error" in r.json(), (name, path, r.status_code, r.text)
                    if "surrogate" in name:  # refused for its character (it was a 500), not for a missing field
                        assert "lone UTF-16 surrogate U+D800" in r.text, (path, r.text)
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200, r.text

    asyncio.run(run())


def test_second_server_on_a_port_in_use_fails_fast_in_one_line(tmp_path_factory):
    server = shared_server(tmp_path_factory)
    port = server.url.rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, "-m", "ember.cli.main", "serve", "--host", "127.0.0.1", "--port", port],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: address already in use (another server, an `ember serve` "
        "perhaps, holds it: stop it or choose another --port)"], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # the first one is untouched
