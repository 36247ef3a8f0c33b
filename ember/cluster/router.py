"""Ray Serve's request router for ember's replicas: prefix affinity balanced against queue length.

Ray Serve builds one router per deployment handle, in the process that holds the handle (the ingress), and asks
it to rank the replicas for each request (`choose_replicas`); it then sends the request to the first ranked
replica whose queue has room. This router remembers which replica each prompt prefix went to (a bounded LRU of
ember.cluster.prefix hashes) and ranks:

- the replica holding the request's longest known prefix first, unless its queue is longer than the shortest
  one by more than `imbalance` requests (a hot prefix must not pile everything on one replica);
- then the others, shortest queue first, and among equal queues the one holding fewer prefixes, so new
  prefixes spread evenly.

Replicas that die or are removed drop out of the table.

Ray Serve ships this module to the processes holding handles by value (cloudpickle): keep its state on the
router instance, never in module globals.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ember.cluster.forwarding import ForwardedRequest

DEFAULT_IMBALANCE = 4
DEFAULT_CAPACITY = 200_000  # prefix hashes remembered (about 25 MB of text seen, at 128 characters a block)


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, capacity: int = DEFAULT_CAPACITY, **_):
        self.imbalance = imbalance
        self.capacity = capacity
        self.owners: OrderedDict[int, ReplicaID] = OrderedDict()  # prefix hash -> replica, least recent first
        self.held: Counter[ReplicaID] = Counter()  # prefix hashes per replica

    @staticmethod
    def _request(pending: PendingRequest | None) -> ForwardedRequest | None:
        if pending is not None and pending.args and isinstance(pending.args[0], ForwardedRequest):
            return pending.args[0]
        return None

    def _queue(self, replica: RunningReplica) -> int:
        known = self.replica_queue_len_cache.get(replica.replica_id)
        return known if known is not None else 0

    def owner(self, prefix: tuple[int, ...], candidates: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        """The candidate that served the longest prefix of `prefix`."""
        for key in reversed(prefix):
            replica_id = self.owners.get(key)
            if replica_id in candidates:
                return candidates[replica_id]
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # No replica may accept now (full queues): Ray Serve then waits with backoff before asking again.
            pending_request.routing_context.should_backoff = True
        request = self._request(pending_request)
        queues = {r.replica_id: self._queue(r) for r in candidate_replicas}
        spread = sorted(candidate_replicas,
                        key=lambda r: (queues[r.replica_id], self.held[r.replica_id], random.random()))
        if request is None or not request.prefix or not spread:
            return [[r] for r in spread]
        owner = self.owner(request.prefix, {r.replica_id: r for r in candidate_replicas})
        if owner is None or queues[owner.replica_id] - queues[spread[0].replica_id] > self.imbalance:
            return [[r] for r in spread]
        return [[owner]] + [[r] for r in spread if r is not owner]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        request = self._request(pending_request)
        if request is None:
            return
        for key in request.prefix:
            previous = self.owners.pop(key, None)
            if previous is not None:
                self.held[previous] -= 1
            self.owners[key] = replica_id
            self.held[replica_id] += 1
        while len(self.owners) > self.capacity:
            _, dropped = self.owners.popitem(last=False)
            self.held[dropped] -= 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._forget(set(self.held) - {r.replica_id for r in replicas})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id})

    def _forget(self, gone: set[ReplicaID]) -> None:
        if not gone:
            return
        for key in [k for k, owner in self.owners.items() if owner in gone]:
            del self.owners[key]
        for replica_id in gone:
            self.held.pop(replica_id, None)
