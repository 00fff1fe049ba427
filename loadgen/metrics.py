"""Aggregates over a run's results: latency distributions, throughput and goodput.

Per request (loadgen.records.RequestResult): TTFT, inter-token latencies, TPOT = (e2e - ttft) /
(output tokens - 1), end-to-end latency, input and output tokens. Aggregates, over completed
requests only:

    ttft, tpot, e2e    one value per request
    itl                every inter-token gap of every request, pooled (as vLLM's benchmark does)
    each               count, mean, std, min, p50, p90, p95, p99, max (seconds; numpy's linear
                       interpolation between order statistics)

    request_throughput       completed requests / duration
    *_token_throughput       tokens of completed requests / duration (input from usage.prompt_tokens)
    goodput                  completed requests meeting every SLO / duration (DistServe's goodput)
    slo_attainment           completed requests meeting every SLO / requests that finished

SLOs (--slo ttft=2s,tpot=50ms,e2e=10s; a number without unit is seconds) bound a request's TTFT,
TPOT and end-to-end latency; a request with one output token has no TPOT and passes that bound.
With no SLO every completed request counts, and goodput equals the request throughput.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loadgen import records
from loadgen.records import RequestResult

PERCENTILES = (50, 90, 95, 99)
_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)?\s*")
_UNIT_S = {"ms": 1e-3, "s": 1.0, None: 1.0}


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def is_met(self, result: RequestResult) -> bool:
        if not result.ok:
            return False
        bounds = ((self.ttft_s, result.ttft_s), (self.tpot_s, result.tpot_s), (self.e2e_s, result.e2e_s))
        return all(bound is None or value is None or value <= bound for bound, value in bounds)

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_duration_s(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"expected a duration such as 2s or 50ms, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_slo(text: str | None) -> SLO:
    """'ttft=2s,tpot=50ms' -> SLO(ttft_s=2.0, tpot_s=0.05)."""
    bounds: dict[str, float] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"SLO items are ttft=, tpot= or e2e=, got {item!r}")
        bounds[f"{name}_s"] = parse_duration_s(value)
    return SLO(**bounds)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, std, min, p50, p90, p95, p99, max of `values` (None when empty)."""
    stats: dict[str, float | int | None] = {"count": len(values)}
    array = np.asarray(values, dtype=np.float64)
    empty = array.size == 0
    stats["mean"] = None if empty else float(array.mean())
    stats["std"] = None if empty else float(array.std())
    stats["min"] = None if empty else float(array.min())
    for p in PERCENTILES:
        stats[f"p{p}"] = None if empty else float(np.percentile(array, p))
    stats["max"] = None if empty else float(array.max())
    return stats


def latency_distributions(results: Sequence[RequestResult]) -> dict[str, dict[str, float | int | None]]:
    done = [r for r in results if r.ok]
    return {
        "ttft": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl": distribution([gap for r in done for gap in r.itl_s]),
        "tpot": distribution([r.tpot_s for r in done if r.tpot_s is not None]),
        "e2e": distribution([r.e2e_s for r in done if r.e2e_s is not None]),
    }


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO, num_not_sent: int = 0) -> dict[str, Any]:
    """The run's summary.json body (the caller adds what describes the run)."""
    done = [r for r in results if r.ok]
    cancelled = sum(r.error_type == records.CANCELLED for r in results)
    failed = [r for r in results if not r.ok and r.error_type != records.CANCELLED]
    num_good = sum(slo.is_met(r) for r in done)
    input_tokens = sum(r.num_input_tokens for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    summary: dict[str, Any] = {
        "num_requests": len(results) + num_not_sent,
        "completed": len(done),
        "failed": len(failed),
        "cancelled": cancelled,
        "not_sent": num_not_sent,
        "errors": dict(Counter(r.error_type for r in failed)),
        "http_statuses": {str(k): v for k, v in Counter(r.http_status for r in failed if r.http_status).items()},
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "input_token_throughput": input_tokens / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "goodput": num_good / duration_s,
        "slo_attainment": num_good / max(1, len(done) + len(failed)),
        "slo": slo.to_json(),
        **latency_distributions(results),
        "input_tokens": distribution([r.num_input_tokens for r in done]),
        "output_tokens": distribution([r.num_output_tokens for r in done]),
        "usage_missing": sum(not r.usage_reported for r in done),
        "usage_mismatches": sum(r.usage_mismatch for r in done),
    }
    tags = sorted({r.tag for r in results if r.tag})
    if len(tags) > 1:
        summary["by_tag"] = {
            tag: {
                "completed": sum(r.tag == tag for r in done),
                **latency_distributions([r for r in results if r.tag == tag]),
            }
            for tag in tags
        }
    return summary
