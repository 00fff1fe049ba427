"""Arrival processes: when each request leaves the client.

    poisson      --rate R (req/s): inter-arrival times ~ Exp(R); mean 1/R, coefficient of variation 1
    gamma        --rate R --burstiness B: inter-arrival times ~ Gamma(shape=B, scale=1/(R*B)); the
                 same mean 1/R, coefficient of variation 1/sqrt(B). B < 1 is burstier than Poisson,
                 B > 1 smoother, B = 1 is Poisson itself (the meaning of vLLM's --burstiness)
    all at once  --rate inf: every request at t = 0
    closed loop  --concurrency N and no rate: N requests in flight, the next leaves when one ends
    trace        the offsets a trace file gives (loadgen.trace), when the workload is a trace and
                 no --rate is set
    sweep        one run per rate of --rates, each a fresh Poisson (or gamma) process, same seed

--concurrency N with a rate caps the requests in flight at N: a request that arrives while N are
in flight waits for one to end (open loop with a cap).

The first request leaves at t = 0 and offsets are the cumulative sums of the inter-arrival times:

    offsets  0      x0     x0+x1     x0+x1+x2   ...
    request  0      1      2         3          ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalConfig:
    rate: float | None = None  # req/s; None or inf: not paced (trace offsets, or all at once)
    burstiness: float = 1.0  # gamma shape
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def is_paced(self) -> bool:
        return self.rate is not None and math.isfinite(self.rate)

    def describe(self, from_trace: bool = False) -> str:
        cap = f", at most {self.max_concurrency} in flight" if self.max_concurrency else ""
        if self.is_paced:
            kind = "poisson" if self.burstiness == 1.0 else f"gamma (burstiness {self.burstiness:g})"
            return f"{kind} at {self.rate:g} req/s{cap}"
        if from_trace:
            return f"trace timestamps{cap}"
        if self.max_concurrency and self.rate is None:
            return f"closed loop, concurrency {self.max_concurrency}"
        return f"all at once{cap}"


def inter_arrival_times(rate: float, burstiness: float, num_requests: int, rng: np.random.Generator) -> np.ndarray:
    """Gamma(shape=burstiness, scale=1/(rate*burstiness)) draws; Exp(rate) when burstiness is 1."""
    if burstiness == 1.0:
        return rng.exponential(1.0 / rate, size=num_requests)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)


def arrival_offsets(
    config: ArrivalConfig, num_requests: int, trace_offsets_s: list[float] | None = None
) -> list[float]:
    """Send time of each request in seconds after the run starts."""
    if config.is_paced:
        assert config.rate is not None
        rng = np.random.default_rng([config.seed, 1])  # a stream apart from the workload's
        gaps = inter_arrival_times(config.rate, config.burstiness, num_requests, rng)
        if num_requests == 0:
            return []
        return [0.0] + [float(x) for x in np.cumsum(gaps[:-1])]
    if trace_offsets_s is not None:
        return list(trace_offsets_s)
    return [0.0] * num_requests
