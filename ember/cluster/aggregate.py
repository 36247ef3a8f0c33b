"""/health and /metrics of a deployment, from every replica's own answers: one Prometheus exposition in which each
sample carries a `replica` label, and one health answer that is ready while any replica is."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus texts by replica name -> one text whose samples are labelled with their replica."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                target.samples.append(sample._replace(labels={**sample.labels, "replica": replica}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


def merge_health(states: dict[str, str], unreachable: int = 0) -> tuple[int, dict]:
    """The states of the replicas that answered ("ok", "loading", "shutting_down", ... by replica name) and the
    number that did not -> (HTTP status, body): ready while any replica is."""
    ready = sum(1 for state in states.values() if state == "ok")
    body = {"status": "ok" if ready else "unavailable",
            "replicas": {"ready": ready, "total": len(states) + unreachable},
            "replica_status": dict(sorted(states.items()))}
    if ready:
        return 200, body
    body["error"] = {"code": 503, "message": "no replica is ready", "type": "unavailable_error"}
    return 503, body
