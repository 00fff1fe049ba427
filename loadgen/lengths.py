"""Length distributions for prompts and outputs, in tokens.

A length is given on the command line as a spec string:

    256                                   fixed: every request has 256 tokens
    uniform:min=128,max=512               uniform integer in [128, 512], both ends included
    lognormal:median=256,sigma=1.0        long-tailed: round(exp(N(ln median, sigma^2))), clipped to
    lognormal:median=256,sigma=1,max=4096 [1, max]; max defaults to LOGNORMAL_DEFAULT_MAX_FACTOR x
                                          the median (16), so one draw never dwarfs a whole run

The lognormal's mean is median * exp(sigma^2 / 2): sigma 1.0 gives a mean 1.65x the median and a
p99 10x the median, the shape of the prompt lengths in public chat traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

LOGNORMAL_DEFAULT_MAX_FACTOR = 16


class LengthDistribution(Protocol):
    def sample(self, rng: np.random.Generator, size: int) -> list[int]:
        """`size` lengths, each >= 1."""
        ...

    @property
    def mean(self) -> float: ...


@dataclass(frozen=True)
class FixedLength:
    num_tokens: int

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"length must be >= 1, got {self.num_tokens}")

    def sample(self, rng: np.random.Generator, size: int) -> list[int]:
        return [self.num_tokens] * size

    @property
    def mean(self) -> float:
        return float(self.num_tokens)

    def __str__(self) -> str:
        return str(self.num_tokens)


@dataclass(frozen=True)
class UniformLength:
    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"uniform lengths need 1 <= min <= max, got {self.min_tokens}, {self.max_tokens}")

    def sample(self, rng: np.random.Generator, size: int) -> list[int]:
        return [int(x) for x in rng.integers(self.min_tokens, self.max_tokens + 1, size=size)]

    @property
    def mean(self) -> float:
        return (self.min_tokens + self.max_tokens) / 2

    def __str__(self) -> str:
        return f"uniform:min={self.min_tokens},max={self.max_tokens}"


@dataclass(frozen=True)
class LognormalLength:
    median_tokens: int
    sigma: float
    max_tokens: int

    def __post_init__(self) -> None:
        if self.median_tokens < 1 or self.sigma < 0 or self.max_tokens < self.median_tokens:
            raise ValueError(f"lognormal lengths need median >= 1, sigma >= 0, max >= median: {self}")

    def sample(self, rng: np.random.Generator, size: int) -> list[int]:
        draws = rng.lognormal(mean=math.log(self.median_tokens), sigma=self.sigma, size=size)
        return [int(x) for x in np.clip(np.rint(draws), 1, self.max_tokens)]

    @property
    def mean(self) -> float:
        return self.median_tokens * math.exp(self.sigma**2 / 2)  # before clipping

    def __str__(self) -> str:
        return f"lognormal:median={self.median_tokens},sigma={self.sigma:g},max={self.max_tokens}"


def _parse_params(text: str, allowed: set[str]) -> dict[str, float]:
    params: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(f"expected one of {sorted(allowed)} as key=value, got {item!r}")
        params[key] = float(value)
    return params


def parse_length(spec: str | int) -> LengthDistribution:
    """A length distribution from its spec string (see the module docstring)."""
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    if not rest and kind.isdigit():
        return FixedLength(int(kind))
    if kind == "uniform":
        params = _parse_params(rest, {"min", "max"})
        if params.keys() != {"min", "max"}:
            raise ValueError(f"uniform needs min and max: {text!r}")
        return UniformLength(int(params["min"]), int(params["max"]))
    if kind == "lognormal":
        params = _parse_params(rest, {"median", "sigma", "max"})
        if not {"median", "sigma"} <= params.keys():
            raise ValueError(f"lognormal needs median and sigma: {text!r}")
        median = int(params["median"])
        max_tokens = int(params.get("max", median * LOGNORMAL_DEFAULT_MAX_FACTOR))
        return LognormalLength(median, params["sigma"], max_tokens)
    raise ValueError(f"length spec must be N, uniform:min=..,max=.. or lognormal:median=..,sigma=..: {text!r}")
