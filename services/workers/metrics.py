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

from services.common.control import SchedulerStats, TransferCounters, WorkerStats
from services.common.histogram import (
    CACHE_CONFIG_LABELS,
    CACHE_CONFIG_METRIC,
    ITERATION_TOKENS_METRIC,
    PHASE_METRICS,
    cache_config_values,
    prometheus_buckets,
)

logger = logging.getLogger(__name__)

MAX_WORKERS_PER_HOST = 64

LABELS = ["model_name", "stage", "worker"]
PATH_BYTES_HELP = "KV bytes by end (sent, received) and path (shared_memory on one host, frames over ZeroMQ)."


class WorkerCollector(Collector):
    """The worker's WorkerStats as Prometheus families (the parts its role has)."""

    def __init__(self, stats: Callable[[], WorkerStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        values = [self._model_name, s.stage, s.name]
        yield _gauge("vllm:num_requests_running", "Requests running on the worker.", values, s.num_running)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting on the worker.", values, s.num_waiting)
        if s.scheduler is not None:
            yield from _scheduler_families(s.scheduler, values)
        if s.transfer is not None:
            yield from _transfer_families(s.transfer, values)


def _scheduler_families(scheduler: SchedulerStats, values: list[str]) -> Iterator[Metric]:
    yield _gauge(
        "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", values, scheduler.kv_cache_usage
    )
    yield _counter(
        "vllm:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        values,
        scheduler.prefix_cache_queried_tokens,
    )
    yield _counter(
        "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", values, scheduler.prefix_cache_hit_tokens
    )
    yield _counter("vllm:num_preemptions", "Requests preempted by the worker.", values, scheduler.num_preemptions)
    if scheduler.host_kv is not None:
        yield _gauge(
            "tristage:kv_host_usage_perc",
            "Fraction of host KV tier blocks holding KV (0..1).",
            values,
            scheduler.kv_host_usage,
        )
        yield _counter(
            "tristage:kv_offloaded_bytes",
            "KV bytes copied from the device to the host tier.",
            values,
            scheduler.kv_offloaded_bytes,
        )
        yield _counter(
            "tristage:kv_onloaded_bytes",
            "KV bytes copied from the host tier back to the device.",
            values,
            scheduler.kv_onloaded_bytes,
        )
        yield _counter(
            "tristage:kv_host_hit_tokens",
            "Prompt tokens restored from the host KV tier instead of recomputed.",
            values,
            scheduler.host_hit_tokens,
        )
    yield _counter(
        "tristage:slo_held_admissions",
        "Prefill chunks held back to keep decodes within the TPOT SLO.",
        values,
        scheduler.num_slo_held_admissions,
    )
    for phase, snapshot in scheduler.phase_seconds.items():
        name, documentation = PHASE_METRICS[phase]
        family = HistogramMetricFamily(name, documentation, labels=LABELS)
        family.add_metric(values, prometheus_buckets(snapshot.buckets), snapshot.sum_s)
        yield family
    if scheduler.iteration_tokens is not None:
        tokens = HistogramMetricFamily(*ITERATION_TOKENS_METRIC, labels=LABELS)
        tokens.add_metric(
            values, prometheus_buckets(scheduler.iteration_tokens.buckets), scheduler.iteration_tokens.sum_tokens
        )
        yield tokens
    if scheduler.cache_config is not None:
        info = GaugeMetricFamily(*CACHE_CONFIG_METRIC, labels=[*LABELS, *CACHE_CONFIG_LABELS])
        info.add_metric([*values, *cache_config_values(scheduler.cache_config)], 1)
        yield info


def _transfer_families(transfer: TransferCounters, values: list[str]) -> Iterator[Metric]:
    yield _counter("tristage:kv_transfer_bytes", "KV bytes sent to decode workers.", values, transfer.bytes_sent)
    by_path = CounterMetricFamily("tristage:kv_transfer_path_bytes", PATH_BYTES_HELP, labels=[*LABELS, "end", "path"])
    for end, path, num_bytes in transfer.bytes_by_path():
        by_path.add_metric([*values, end, path], num_bytes)
    yield by_path
    yield _counter(
        "tristage:kv_transfer_failures", "KV transfers refused, timed out or unacked.", values, transfer.num_failures
    )
    yield _counter(
        "tristage:kv_transfer_fallbacks", "Requests recomputed instead of imported.", values, transfer.num_fallbacks
    )
    yield _counter(
        "tristage:kv_transfer_staging_waits",
        "KV transfers that waited for room in the prefill worker's staging buffer.",
        values,
        transfer.num_staging_waits,
    )
    seconds = HistogramMetricFamily("tristage:kv_transfer_seconds", "One request's KV transfer.", labels=LABELS)
    seconds.add_metric(values, prometheus_buckets(transfer.seconds.buckets), transfer.seconds.sum_s)
    yield seconds


def _gauge(name: str, documentation: str, values: list[str], value: float) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=LABELS)
    family.add_metric(values, value)
    return family


def _counter(name: str, documentation: str, values: list[str], value: float) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=LABELS)
    family.add_metric(values, value)
    return family


def serve_worker_metrics(stats: Callable[[], WorkerStats], model_name: str, host: str, base_port: int) -> int:
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
