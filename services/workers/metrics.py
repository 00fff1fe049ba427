"""A worker's own /metrics (`tristage serve --worker-metrics-port`), for deployments where Prometheus
scrapes every pod: the same per-worker series the gateway exports from its snapshots (which then
stops exporting them, so nothing is counted twice).

The k-th worker on a host listens on the first free port from `base_port` on (base_port + k).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

MAX_WORKERS_PER_HOST = 64

GAUGES = {"num_running": ("vllm:num_requests_running", "Requests running on the worker."),
          "num_waiting": ("vllm:num_requests_waiting", "Requests waiting on the worker."),
          "kv_cache_usage": ("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).")}
COUNTERS = {"prefix_cache_queried_tokens": ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "prefix_cache_hit_tokens": ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
            "num_preemptions": ("vllm:num_preemptions", "Requests preempted by the worker."),
            "kv_transfer_bytes_sent": ("tristage:kv_transfer_bytes", "KV bytes sent to decode workers."),
            "kv_transfer_failures": ("tristage:kv_transfer_failures", "KV transfers refused, timed out or unacked."),
            "kv_transfer_fallbacks": ("tristage:kv_transfer_fallbacks", "Requests recomputed instead of imported.")}


class WorkerCollector(Collector):
    def __init__(self, stats: Callable[[], dict], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = ["model_name", "stage", "worker"]
        values = [self._model_name, s["stage"], s["name"]]
        for key, (name, doc) in GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, s[key])
            yield family
        for key, (name, doc) in COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, s[key])
            yield family
        seconds = HistogramMetricFamily("tristage:kv_transfer_seconds", "One request's KV transfer.", labels=labels)
        buckets = [("+Inf" if b == float("inf") else str(b), c) for b, c in s["kv_transfer_seconds_buckets"]]
        seconds.add_metric(values, buckets, s["kv_transfer_seconds"])
        yield seconds


def serve_worker_metrics(stats: Callable[[], dict], model_name: str, host: str, base_port: int) -> int:
    """Start the HTTP endpoint on the first free port from base_port; returns the port."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(stats, model_name))
    for port in range(base_port, base_port + MAX_WORKERS_PER_HOST):
        try:
            start_http_server(port, addr=host, registry=registry)
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free metrics port in [{base_port}, {base_port + MAX_WORKERS_PER_HOST})")
