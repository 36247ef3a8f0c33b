"""Prometheus metrics on their own registry: latency histograms observed by the server, engine gauges and
token counters read from `engine.stats()` at scrape time."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ember.engine.speculator import acceptance

if TYPE_CHECKING:
    from ember.server.state import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    def __init__(self, models: ModelRegistry):
        self.models = models

    def collect(self):
        gauges = {
            "running": GaugeMetricFamily("ember_requests_running", "Sequences being decoded", labels=["model"]),
            "waiting": GaugeMetricFamily("ember_requests_waiting", "Sequences waiting for a slot", labels=["model"]),
            "kv_blocks_used": GaugeMetricFamily("ember_kv_blocks_used", "KV cache blocks in use", labels=["model"]),
            "kv_blocks_total": GaugeMetricFamily("ember_kv_blocks_total", "KV cache blocks", labels=["model"]),
        }
        hit_rate = GaugeMetricFamily("ember_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix "
                                     "cache", labels=["model"])
        prompt = CounterMetricFamily("ember_prompt_tokens", "Prompt tokens processed", labels=["model"])
        generated = CounterMetricFamily("ember_generation_tokens", "Tokens generated", labels=["model"])
        preemptions = CounterMetricFamily("ember_preemptions", "Sequences preempted for KV space", labels=["model"])
        drafted = CounterMetricFamily("ember_spec_draft_tokens", "Speculative tokens drafted", labels=["model"])
        accepted = CounterMetricFamily("ember_spec_accepted_tokens", "Drafted tokens the target kept",
                                       labels=["model"])
        rate = GaugeMetricFamily("ember_spec_acceptance_rate", "Share of drafted tokens kept", labels=["model"])
        length = GaugeMetricFamily("ember_spec_mean_accepted_length", "Tokens a sequence gains per verification "
                                   "(kept drafts plus the target's own)", labels=["model"])
        speculating = False
        for entry in self.models.list():
            stats = entry.engine.stats()
            for key, family in gauges.items():
                family.add_metric([entry.name], stats.get(key, 0))
            seen = stats.get("prefix_hit_tokens", 0) + stats.get("prefix_miss_tokens", 0)
            hit_rate.add_metric([entry.name], stats.get("prefix_hit_tokens", 0) / seen if seen else 0.0)
            prompt.add_metric([entry.name], stats.get("prompt_tokens_total", 0))
            generated.add_metric([entry.name], stats.get("generation_tokens_total", 0))
            preemptions.add_metric([entry.name], stats.get("preemptions", 0))
            if "spec_verifications" in stats:  # only engines that speculate report these
                speculating = True
                drafted.add_metric([entry.name], stats["spec_proposed_tokens"])
                accepted.add_metric([entry.name], stats["spec_accepted_tokens"])
                measured = acceptance(stats) or (0.0, 0.0)
                rate.add_metric([entry.name], measured[0])
                length.add_metric([entry.name], measured[1])
        yield from gauges.values()
        yield from (hit_rate, prompt, generated, preemptions)
        if speculating:
            yield from (drafted, accepted, rate, length)


class _RuntimeCollector:
    """What a leak would grow, for soak tests (benchmarks/soak.py): the event loop's live tasks and the
    process's Python threads."""

    def collect(self):
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped off the event loop: there is no loop to count
            tasks = None
        if tasks is not None:
            yield GaugeMetricFamily("ember_asyncio_tasks", "Live tasks on the server's event loop", value=tasks)
        yield GaugeMetricFamily("ember_threads", "Live Python threads", value=threading.active_count())


class Metrics:
    def __init__(self, models: ModelRegistry):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(models))
        self.registry.register(_RuntimeCollector())
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds, ...
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time from request to its first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between a request's streamed tokens",
                             ["model"], buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ember_request_latency_seconds", "Time from request to its last token", ["model"],
                             buckets=_TTFT_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
