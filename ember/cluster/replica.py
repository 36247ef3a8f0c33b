"""One replica of a Ray Serve deployment of ember: the single-process server's app, state and model pool,
answering the requests the ingress forwards (ember.cluster.forwarding)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ember.cluster.forwarding import ForwardedRequest, ResponseStart, collect, replay
from ember.server.app import create_app
from ember.server.pool import ModelPool
from ember.server.state import ServerState, Settings


class EmberReplica:
    """Made by Ray Serve in its own worker process; `pool_options` are ModelPool's keyword arguments (the
    model, the engine arguments with the threads matching the replica's CPUs, the memory budget)."""

    async def __init__(self, settings: Settings, pool_options: dict[str, Any]):
        from ray import serve

        self.name = serve.get_replica_context().replica_id.unique_id
        self.state = ServerState(settings, pool=ModelPool(**pool_options, preload=True))
        self.app = create_app(self.state)
        # What the app's lifespan does in a single-process server: load the model; a failure fails the replica.
        await self.state.startup()
        await self.state.wait_ready()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        async for item in replay(self.app, request, self.name):
            yield item

    async def answer(self, request: ForwardedRequest) -> tuple[ResponseStart, bytes]:
        """The whole answer in one reply: for requests whose answer is not a stream (one Ray message each way)."""
        return await collect(self.app, request, self.name)

    async def probe(self, request: ForwardedRequest, timeout: float) -> tuple[ResponseStart, bytes]:
        """A short request's whole answer (the ingress sends /health and /metrics to every replica)."""
        return await collect(self.app, request, self.name, timeout)

    async def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose model pool has stopped is replaced."""
        if self.state.pool.closing or self.state.load_error is not None:
            raise RuntimeError("the replica's model pool has stopped")

    async def __del__(self):
        await self.state.shutdown()
