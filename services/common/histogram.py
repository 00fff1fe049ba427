"""Observations counted into buckets, read out the way Prometheus histograms are (cumulative, then +Inf),
and the names of the engine's metrics that both exporters give them (services.workers.metrics on a
worker's own /metrics, services.gateway.metrics from the workers' snapshots)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.control import CacheConfigInfo, SecondsHistogramSnapshot, TokensHistogramSnapshot

# 1 ms .. 10 s: a KV transfer, a batch of images through a vision tower
DEFAULT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# vLLM's buckets for vllm:iteration_tokens_total (tokens scheduled in one engine step)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class SecondsHistogram:
    bounds_s: tuple[float, ...] = DEFAULT_SECONDS_BUCKETS  # upper bounds, ascending
    sum_s: float = 0.0
    counts: list[int] = field(init=False)  # per bucket, the last one past every bound

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds_s) + 1)

    def observe(self, seconds: float) -> None:
        self.sum_s += seconds
        self.counts[_bucket_index(self.bounds_s, seconds)] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, count at or below it), ending with +Inf."""
        return _cumulative(self.bounds_s, self.counts)

    def snapshot(self) -> SecondsHistogramSnapshot:
        """The buckets and sum as the control plane carries them (services.common.control)."""
        return SecondsHistogramSnapshot(buckets=self.cumulative(), sum_s=self.sum_s)


@dataclass
class TokensHistogram:
    bounds_tokens: tuple[int, ...]  # upper bounds, ascending
    sum_tokens: int = 0
    counts: list[int] = field(init=False)  # per bucket, the last one past every bound

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds_tokens) + 1)

    def observe(self, num_tokens: int) -> None:
        self.sum_tokens += num_tokens
        self.counts[_bucket_index(self.bounds_tokens, num_tokens)] += 1

    def snapshot(self) -> TokensHistogramSnapshot:
        return TokensHistogramSnapshot(buckets=_cumulative(self.bounds_tokens, self.counts), sum_tokens=self.sum_tokens)


def iteration_tokens_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """vLLM's buckets up to a step's token budget (no step schedules more)."""
    return tuple(bound for bound in ITERATION_TOKENS_BUCKETS if bound <= max_num_batched_tokens)


def _bucket_index(bounds: Sequence[float], value: float) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[float, int]]:
    """Bounds as floats, whatever they counted: a token bound 8 reads "8.0", as prometheus_client writes
    it, on either exporter (msgpack would turn an int into a float on the way to the gateway)."""
    total, result = 0, []
    for bound, count in zip((*bounds, float("inf")), counts):
        total += count
        result.append((float(bound), total))
    return result


def prometheus_buckets(buckets: Sequence[tuple[float, int]]) -> list[tuple[str, int]]:
    """Cumulative (upper bound, count) pairs as a Prometheus histogram family takes them ("+Inf" last)."""
    return [("+Inf" if bound == float("inf") else str(bound), count) for bound, count in buckets]


# ----------------------------------------------------------------------------------------------
# Names and labels both exporters use

PHASE_METRICS = {  # SchedulerStats.phase_seconds -> (vLLM's metric, its help)
    "queue": ("vllm:request_queue_time_seconds", "Arrival at the engine to its first step."),
    "prefill": ("vllm:request_prefill_time_seconds", "First step to the first token."),
    "decode": ("vllm:request_decode_time_seconds", "First token to the end."),
    "inference": ("vllm:request_inference_time_seconds", "First step to the end."),
}
# SchedulerStats.iteration_tokens (a histogram; vLLM's name keeps `_total` before `_bucket`)
ITERATION_TOKENS_METRIC = ("vllm:iteration_tokens_total", "Tokens scheduled per engine step.")
# SchedulerStats.cache_config: an info gauge, 1, whose labels are the configuration (as vLLM's)
CACHE_CONFIG_METRIC = ("vllm:cache_config_info", "The KV cache configuration (its labels; the value is 1).")
CACHE_CONFIG_LABELS = ("block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype", "gpu_memory_utilization")


def cache_config_values(info: CacheConfigInfo) -> list[str]:
    """vllm:cache_config_info's label values in CACHE_CONFIG_LABELS order, written as vLLM writes them
    (str(): "16", "True", "0.9")."""
    return [str(getattr(info, name)) for name in CACHE_CONFIG_LABELS]
