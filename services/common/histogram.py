"""Durations counted into buckets, read out the way Prometheus histograms are (cumulative, then +Inf)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.control import SecondsHistogramSnapshot

# 1 ms .. 10 s: a KV transfer, a batch of images through a vision tower
DEFAULT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class SecondsHistogram:
    bounds_s: tuple[float, ...] = DEFAULT_SECONDS_BUCKETS  # upper bounds, ascending
    sum_s: float = 0.0
    counts: list[int] = field(init=False)  # per bucket, the last one past every bound

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds_s) + 1)

    def observe(self, seconds: float) -> None:
        self.sum_s += seconds
        index = next((i for i, bound in enumerate(self.bounds_s) if seconds <= bound), len(self.bounds_s))
        self.counts[index] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, count at or below it), ending with +Inf."""
        total, result = 0, []
        for bound, count in zip((*self.bounds_s, float("inf")), self.counts):
            total += count
            result.append((bound, total))
        return result

    def snapshot(self) -> SecondsHistogramSnapshot:
        """The buckets and sum as the control plane carries them (services.common.control)."""
        return SecondsHistogramSnapshot(buckets=self.cumulative(), sum_s=self.sum_s)


def prometheus_buckets(buckets: Sequence[tuple[float, int]]) -> list[tuple[str, int]]:
    """Cumulative (upper bound, count) pairs as a Prometheus histogram family takes them ("+Inf" last)."""
    return [("+Inf" if bound == float("inf") else str(bound), count) for bound, count in buckets]


PHASE_METRICS = {  # SchedulerStats.phase_seconds -> (vLLM's metric, its help)
    "queue": ("vllm:request_queue_time_seconds", "Arrival at the engine to its first step."),
    "prefill": ("vllm:request_prefill_time_seconds", "First step to the first token."),
    "decode": ("vllm:request_decode_time_seconds", "First token to the end."),
    "inference": ("vllm:request_inference_time_seconds", "First step to the end."),
}
