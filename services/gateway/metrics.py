"""The gateway's Prometheus metrics, in a registry of its own (no global state).

Request metrics are observed here as requests run; per-worker gauges and counters come from
`backend.snapshot()`, which the /metrics handler awaits and hands to `render()` just before
the text is generated (a collector cannot await).

vLLM's names where the meaning matches, so existing dashboards work:

    vllm:time_to_first_token_seconds    histogram  arrival -> first token
    tristage:ttft_part_seconds          histogram  per part of each engine request's TTFT (services.gateway.ttft):
                                                   queue, image_wait, prefill_queue, prefill, other (they add
                                                   up to it); encoder_queue, decode, encode, transfer (image_wait's)
    vllm:inter_token_latency_seconds    histogram  between two steps of one request that brought tokens
    vllm:e2e_request_latency_seconds    histogram  arrival -> last token (finished requests only)
    vllm:prompt_tokens_total            counter    prompt tokens of requests that started
    vllm:generation_tokens_total        counter    tokens generated
    vllm:request_success_total          counter    finished completions, by finished_reason
    vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc          per worker (gauges)
    vllm:prefix_cache_queries / _hits (tokens), vllm:num_preemptions        per worker (counters)
    vllm:request_{queue,prefill,decode,inference}_time_seconds               per worker (histograms)
    vllm:iteration_tokens_total         histogram  per worker: tokens scheduled in one engine step
    vllm:cache_config_info              gauge      per worker: 1, labelled with its KV cache configuration
    tristage:kv_transfer_bytes_total / _failures_total / _fallbacks_total     per worker (counters)
    tristage:kv_transfer_seconds        histogram  per worker: one request's KV, first byte to last
    tristage:kv_transfer_path_bytes_total  per worker, end (sent, received) and path (shared_memory, frames)
    tristage:encode_latency_seconds     histogram  per encode worker: one batch of images through the tower
    tristage:embedding_cache_queries_total / _hits_total, tristage:embedding_transfer_bytes_total
                                        counters   per encode worker
    tristage:request_migrations_total   counter    requests moved off a dead worker
    tristage:kv_room_waits_total        counter    requests that waited for a decode worker's KV room
    tristage:requests_waiting_for_kv_room  gauge   requests waiting for it now (services.gateway.room_queue)
    tristage:router_decisions_total     counter    by policy and reason
    tristage:router_predicted_hit_tokens_total / _observed_hit_tokens_total   counters
    tristage:router_load_imbalance      gauge      busiest / least busy prefill worker by load cost
    tristage:worker_restarts_total      counter    per worker: Ray restarts of it so far
    tristage:worker_crash_looping       gauge      per worker: 1 while it restarted CRASH_LOOP_RESTARTS times
                                                   within WINDOW_S (services.common.restarts), else 0
    tristage:admission_rejections_total counter    by reason ("requests", "sequences", "bytes", "tokens",
                                                   "not_ready", "connections": refused past max_connections)
    tristage:gateway_requests_in_flight gauge      admitted and not yet ended
    tristage:gateway_queued_requests / _queued_sequences / _queued_prompt_tokens
                                        gauges     waiting for their first token
    tristage:gateway_queued_prompt_bytes gauge     prompt text admitted and not yet tokenized
    tristage:gateway_open_connections   gauge      HTTP connections served (counted against max_connections)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.histogram import (
    CACHE_CONFIG_LABELS,
    CACHE_CONFIG_METRIC,
    ITERATION_TOKENS_METRIC,
    PHASE_METRICS,
    prometheus_buckets,
)
from services.gateway.admission import AdmissionController
from services.gateway.backend import ClusterStats, WorkerSnapshot
from services.gateway.http_server import ConnectionCap

TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    600.0,
)
ITL_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
# a request's mean time per output token (vllm:request_time_per_output_token_seconds), vLLM's buckets
REQUEST_TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


def one_two_five_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's buckets for token counts)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale > limit:
                return tuple(buckets)
            buckets.append(step * scale)
        scale *= 10


E2E_BUCKETS_S = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1800.0,
)

_WORKER_LABELS = ("model_name", "stage", "worker")


class _WorkerCollector(Collector):
    """Exports the snapshot it was last given; `render()` sets it right before collecting."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name
        self.snapshot: Sequence[WorkerSnapshot] = ()
        self.cluster: ClusterStats | None = None

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "running": GaugeMetricFamily(
                "vllm:num_requests_running", "Requests running on the worker.", labels=_WORKER_LABELS
            ),
            "waiting": GaugeMetricFamily(
                "vllm:num_requests_waiting", "Requests waiting on the worker.", labels=_WORKER_LABELS
            ),
            "kv": GaugeMetricFamily(
                "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", labels=_WORKER_LABELS
            ),
        }
        counters = {
            "queries": CounterMetricFamily(
                "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=_WORKER_LABELS
            ),
            "hits": CounterMetricFamily(
                "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=_WORKER_LABELS
            ),
            "preemptions": CounterMetricFamily(
                "vllm:num_preemptions", "Requests preempted by the worker.", labels=_WORKER_LABELS
            ),
        }
        counters.update(
            transfer_bytes=CounterMetricFamily(
                "tristage:kv_transfer_bytes", "KV bytes sent to decode workers.", labels=_WORKER_LABELS
            ),
            transfer_failures=CounterMetricFamily(
                "tristage:kv_transfer_failures",
                "KV transfers refused, timed out or unacknowledged.",
                labels=_WORKER_LABELS,
            ),
            transfer_fallbacks=CounterMetricFamily(
                "tristage:kv_transfer_fallbacks",
                "Requests a decode worker recomputed instead of importing KV.",
                labels=_WORKER_LABELS,
            ),
            transfer_staging_waits=CounterMetricFamily(
                "tristage:kv_transfer_staging_waits",
                "KV transfers that waited for room in the prefill worker's staging buffer.",
                labels=_WORKER_LABELS,
            ),
        )
        transfer_seconds = HistogramMetricFamily(
            "tristage:kv_transfer_seconds", "One request's KV transfer.", labels=_WORKER_LABELS
        )
        transfer_path_bytes = CounterMetricFamily(
            "tristage:kv_transfer_path_bytes",
            "KV bytes by end (sent, received) and path (shared_memory on one host, frames over ZeroMQ).",
            labels=(*_WORKER_LABELS, "end", "path"),
        )
        encode_latency = HistogramMetricFamily(
            "tristage:encode_latency_seconds",
            "One batch of images through the vision tower.",
            labels=_WORKER_LABELS,
        )
        encode = {
            "queries": CounterMetricFamily(
                "tristage:embedding_cache_queries", "Images looked up in the embedding cache.", labels=_WORKER_LABELS
            ),
            "hits": CounterMetricFamily(
                "tristage:embedding_cache_hits", "Images found in the embedding cache.", labels=_WORKER_LABELS
            ),
            "bytes": CounterMetricFamily(
                "tristage:embedding_transfer_bytes", "Embedding bytes sent to prefill workers.", labels=_WORKER_LABELS
            ),
        }
        phases = {
            phase: HistogramMetricFamily(name, documentation, labels=_WORKER_LABELS)
            for phase, (name, documentation) in PHASE_METRICS.items()
        }
        iteration_tokens = HistogramMetricFamily(*ITERATION_TOKENS_METRIC, labels=_WORKER_LABELS)
        cache_config = GaugeMetricFamily(*CACHE_CONFIG_METRIC, labels=[*_WORKER_LABELS, *CACHE_CONFIG_LABELS])
        for worker in self.snapshot:
            labels = [self._model_name, worker.stage, worker.worker]
            for phase, buckets, sum_s in worker.phase_seconds:
                phases[phase].add_metric(labels, prometheus_buckets(buckets), sum_s)
            if worker.iteration_tokens_buckets:
                iteration_tokens.add_metric(
                    labels, prometheus_buckets(worker.iteration_tokens_buckets), worker.iteration_tokens_sum
                )
            if worker.cache_config:
                cache_config.add_metric([*labels, *worker.cache_config], 1)
            gauges["running"].add_metric(labels, worker.num_running)
            gauges["waiting"].add_metric(labels, worker.num_waiting)
            gauges["kv"].add_metric(labels, worker.kv_cache_usage)
            counters["queries"].add_metric(labels, worker.prefix_cache_queried_tokens)
            counters["hits"].add_metric(labels, worker.prefix_cache_hit_tokens)
            counters["preemptions"].add_metric(labels, worker.num_preemptions)
            counters["transfer_bytes"].add_metric(labels, worker.kv_transfer_bytes)
            counters["transfer_failures"].add_metric(labels, worker.kv_transfer_failures)
            counters["transfer_fallbacks"].add_metric(labels, worker.kv_transfer_fallbacks)
            counters["transfer_staging_waits"].add_metric(labels, worker.kv_transfer_staging_waits)
            for end, path, num_bytes in worker.kv_transfer_bytes_by_path:
                transfer_path_bytes.add_metric([*labels, end, path], num_bytes)
            if worker.kv_transfer_seconds_buckets:
                transfer_seconds.add_metric(
                    labels, prometheus_buckets(worker.kv_transfer_seconds_buckets), worker.kv_transfer_seconds_sum
                )
            if worker.stage == "encode":
                encode_latency.add_metric(
                    labels, prometheus_buckets(worker.encode_seconds_buckets), worker.encode_seconds_sum
                )
                encode["queries"].add_metric(labels, worker.embedding_cache_queries)
                encode["hits"].add_metric(labels, worker.embedding_cache_hits)
                encode["bytes"].add_metric(labels, worker.embedding_bytes_sent)
        yield from gauges.values()
        yield from counters.values()
        yield from phases.values()
        yield iteration_tokens
        yield cache_config
        yield transfer_seconds
        yield transfer_path_bytes
        yield encode_latency
        yield from encode.values()
        yield from self._cluster_metrics()

    def _cluster_metrics(self) -> Iterator[Metric]:
        cluster = self.cluster
        if cluster is None:
            return
        model = [self._model_name]
        migrations = CounterMetricFamily(
            "tristage:request_migrations", "Requests moved off a dead worker.", labels=["model_name"]
        )
        migrations.add_metric(model, cluster.migrations)
        room_waits = CounterMetricFamily(
            "tristage:kv_room_waits", "Requests that waited for a decode worker's KV room.", labels=["model_name"]
        )
        room_waits.add_metric(model, cluster.kv_room_waits)
        waiting = GaugeMetricFamily(
            "tristage:requests_waiting_for_kv_room",
            "Requests waiting for a decode worker's KV room now.",
            labels=["model_name"],
        )
        waiting.add_metric(model, cluster.waiting_for_kv_room)
        decisions = CounterMetricFamily(
            "tristage:router_decisions", "Placements by policy and reason.", labels=["model_name", "policy", "reason"]
        )
        for (policy, reason), count in sorted(cluster.decisions.items()):
            decisions.add_metric([*model, policy, reason], count)
        predicted = CounterMetricFamily(
            "tristage:router_predicted_hit_tokens",
            "Prompt tokens the router expected the prefix cache to serve.",
            labels=["model_name"],
        )
        predicted.add_metric(model, cluster.predicted_hit_tokens)
        observed = CounterMetricFamily(
            "tristage:router_observed_hit_tokens",
            "Prompt tokens the prefix cache did serve (of observed placements).",
            labels=["model_name"],
        )
        observed.add_metric(model, cluster.observed_hit_tokens)
        imbalance = GaugeMetricFamily(
            "tristage:router_load_imbalance",
            "Busiest over least busy prefill worker, by load cost.",
            labels=["model_name"],
        )
        imbalance.add_metric(model, cluster.load_imbalance)
        yield from (migrations, room_waits, waiting, decisions, predicted, observed, imbalance)
        yield from self._restart_metrics(cluster)

    def _restart_metrics(self, cluster: ClusterStats) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "tristage:worker_restarts", "Ray restarts of the worker so far.", labels=_WORKER_LABELS
        )
        crash_looping = GaugeMetricFamily(
            "tristage:worker_crash_looping",
            "1 while the worker restarts too often (services.common.restarts), else 0.",
            labels=_WORKER_LABELS,
        )
        for (stage, worker), (num_restarts, looping) in sorted(cluster.worker_restarts.items()):
            restarts.add_metric([self._model_name, stage, worker], num_restarts)
            crash_looping.add_metric([self._model_name, stage, worker], float(looping))
        yield from (restarts, crash_looping)


class GatewayMetrics:
    def __init__(self, model_name: str, admission: AdmissionController, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        self.max_model_len = max_model_len
        labels = ("model_name",)
        token_buckets = one_two_five_buckets(max_model_len)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry).labels(model_name)

        # per engine request (a prompt and its n completions), as vLLM's V1 front end observes them
        self._request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "A request's prompt tokens.", token_buckets
        )
        self._request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "A request's generated tokens.", token_buckets
        )
        self._request_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "A request's mean time per output token after the first.",
            REQUEST_TPOT_BUCKETS_S,
        )
        self._params_n = histogram("vllm:request_params_n", "A request's n.", PARAMS_N_BUCKETS)
        self._params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "A request's max_tokens (the context left when unset).", token_buckets
        )
        # the same observations as vllm:inter_token_latency_seconds under the name vLLM's stock dashboard plots
        self._legacy_tpot = histogram(
            "vllm:time_per_output_token_seconds", "Time between two steps of a request (legacy name).", ITL_BUCKETS_S
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        ).labels(model_name)
        self._ttft_parts = Histogram(
            "tristage:ttft_part_seconds",
            "Where the time to first token went, by part (services.gateway.ttft).",
            ("model_name", "part"),
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between two steps of a request.",
            labels,
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        ).labels(model_name)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Arrival to last token.",
            labels,
            buckets=E2E_BUCKETS_S,
            registry=self.registry,
        ).labels(model_name)
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", labels, registry=self.registry).labels(
            model_name
        )
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", labels, registry=self.registry
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success", "Finished completions.", ("model_name", "finished_reason"), registry=self.registry
        )
        self._rejections = Counter(
            "tristage:admission_rejections",
            "Requests refused by admission.",
            ("model_name", "reason"),
            registry=self.registry,
        )
        self._model_name = model_name
        self._gauge(
            admission, "tristage:gateway_requests_in_flight", "Requests admitted and not yet ended.", "num_in_flight"
        )
        self._gauge(
            admission,
            "tristage:gateway_queued_requests",
            "Requests waiting for their first token.",
            "num_queued_requests",
        )
        self._gauge(
            admission,
            "tristage:gateway_queued_prompt_tokens",
            "Prompt tokens of the requests waiting for their first token.",
            "num_queued_tokens",
        )
        self._gauge(
            admission,
            "tristage:gateway_queued_sequences",
            "Sequences (n x prompts) of the requests waiting for their first token.",
            "num_queued_sequences",
        )
        self._gauge(
            admission,
            "tristage:gateway_queued_prompt_bytes",
            "UTF-8 bytes of prompt text admitted and not yet tokenized.",
            "num_queued_prompt_bytes",
        )
        self._workers = _WorkerCollector(model_name)
        self.registry.register(self._workers)
        ProcessCollector(registry=self.registry)

    def track_connections(self, connections: ConnectionCap) -> None:
        self._gauge(connections, "tristage:gateway_open_connections", "HTTP connections served at once.", "num_open")

    def _gauge(
        self, source: AdmissionController | ConnectionCap, name: str, documentation: str, attribute: str
    ) -> None:
        gauge = Gauge(name, documentation, ("model_name",), registry=self.registry)
        gauge.labels(self._model_name).set_function(lambda: getattr(source, attribute))

    def observe_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def observe_ttft_parts(self, seconds_by_part: dict[str, float]) -> None:
        for part, seconds in seconds_by_part.items():
            self._ttft_parts.labels(self._model_name, part).observe(seconds)

    def observe_inter_token(self, latency_s: float) -> None:
        self._itl.observe(latency_s)
        self._legacy_tpot.observe(latency_s)

    def observe_params(self, n: int, max_tokens: int | None, num_prompt_tokens: int) -> None:
        self._params_n.observe(n)
        left = self.max_model_len - num_prompt_tokens  # what an unset max_tokens allows
        self._params_max_tokens.observe(max_tokens if max_tokens is not None else left)

    def observe_request(self, num_prompt_tokens: int, num_generation_tokens: int, tpot_s: float | None) -> None:
        """One engine request ended: its prompt, its completions' tokens, its mean time per output token."""
        self._request_prompt_tokens.observe(num_prompt_tokens)
        self._request_generation_tokens.observe(num_generation_tokens)
        if tpot_s is not None:
            self._request_tpot.observe(tpot_s)

    def observe_finished(self, e2e_s: float) -> None:
        self._e2e.observe(e2e_s)

    def count_prompt_tokens(self, num_tokens: int) -> None:
        self._prompt_tokens.inc(num_tokens)

    def count_generation_tokens(self, num_tokens: int) -> None:
        self._generation_tokens.inc(num_tokens)

    def count_success(self, finished_reason: str) -> None:
        self._success.labels(self._model_name, finished_reason).inc()

    def count_rejection(self, reason: str) -> None:
        self._rejections.labels(self._model_name, reason).inc()

    def render(self, snapshot: Sequence[WorkerSnapshot], cluster: ClusterStats | None = None) -> bytes:
        """The exposition text, with `snapshot` as the per-worker values. Never awaits."""
        self._workers.snapshot, self._workers.cluster = snapshot, cluster
        try:
            return generate_latest(self.registry)
        finally:
            self._workers.snapshot, self._workers.cluster = (), None
