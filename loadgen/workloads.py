"""Workloads: the requests of a run, generated locally from a seed.

Every length is in tokens of the target's tokenizer (loadgen.prompts) and is drawn from a length
distribution (loadgen.lengths: fixed, uniform or lognormal). Outputs ask for exactly their length
(the client sends ignore_eos and min_tokens = max_tokens).

    random         independent prompts of --input-len tokens, outputs of --output-len
    shared-prefix  Preble's synthetic workload and SGLang's generated-shared-prefix: --num-groups
                   prefixes of --prefix-len tokens; each request picks group i with Zipf popularity
                   P(i) ~ 1 / (i + 1)^s (--zipf s, default 1.1; s = 0 is uniform), then appends its
                   own suffix of --suffix-len tokens. Group 0 is the most popular.
    multi-turn     conversations of --turns turns; each turn sends the whole history (earlier user
                   messages and the replies actually received) plus a new user message of
                   --input-len tokens. Requests go out turn by turn across conversations
                   (c0t0 c1t0 ... c0t1 c1t1 ...), and a turn waits for its conversation's last reply.
    long-context   Mnemosyne's mixed workload: a share --long-fraction (default 0.1) of the requests,
                   at random positions, has --long-input-len tokens, the rest --input-len; tagged
                   "long" and "short" so the summary breaks latencies down by class
    multimodal     --input-len tokens of text and --images-per-request images each (loadgen.images),
                   chat endpoint only
    trace          one request per row of a trace file (loadgen.trace), with its lengths and arrival
                   time; hash_ids, where present, become shared token blocks
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from loadgen.images import ImageConfig, ImagePool
from loadgen.lengths import LengthDistribution
from loadgen.prompts import PromptSynthesizer
from loadgen.records import RequestSpec
from loadgen.trace import read_trace

DEFAULT_ZIPF_EXPONENT = 1.1
DEFAULT_LONG_FRACTION = 0.1
DEFAULT_TRACE_BLOCK_SIZE = 512  # Mooncake's block of tokens per hash id


class Workload(Protocol):
    name: str

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        """The run's requests in send order; num_requests None means all a trace has."""
        ...


def describe(workload: Workload) -> dict[str, Any]:
    """The workload's parameters as JSON-ready values."""
    params: dict[str, Any] = {"name": workload.name}
    for f in fields(workload):  # type: ignore[arg-type]
        value = getattr(workload, f.name)
        params[f.name] = value if isinstance(value, (int, float, str, type(None))) else str(value)
    return params


def _count(num_requests: int | None) -> int:
    if num_requests is None or num_requests < 1:
        raise ValueError("synthetic workloads need --num-requests >= 1")
    return num_requests


@dataclass(frozen=True)
class RandomWorkload:
    input_len: LengthDistribution
    output_len: LengthDistribution
    name = "random"

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        n = _count(num_requests)
        inputs, outputs = self.input_len.sample(rng, n), self.output_len.sample(rng, n)
        return [RequestSpec(i, synthesizer.random(inputs[i], rng), outputs[i]) for i in range(n)]


def zipf_popularity(num_groups: int, exponent: float) -> np.ndarray:
    """P(group i) proportional to 1 / (i + 1)^exponent, i = 0 .. num_groups - 1."""
    weights: np.ndarray = 1.0 / np.arange(1, num_groups + 1, dtype=np.float64) ** exponent
    return weights / float(weights.sum())


@dataclass(frozen=True)
class SharedPrefixWorkload:
    num_groups: int
    prefix_len: LengthDistribution
    suffix_len: LengthDistribution
    output_len: LengthDistribution
    zipf_exponent: float = DEFAULT_ZIPF_EXPONENT
    name = "shared-prefix"

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        n = _count(num_requests)
        prefixes = [synthesizer.random_ids(length, rng) for length in self.prefix_len.sample(rng, self.num_groups)]
        groups = rng.choice(self.num_groups, size=n, p=zipf_popularity(self.num_groups, self.zipf_exponent))
        suffixes, outputs = self.suffix_len.sample(rng, n), self.output_len.sample(rng, n)
        specs = []
        for i, group in enumerate(int(g) for g in groups):
            prompt = synthesizer.from_ids(prefixes[group] + synthesizer.random_ids(suffixes[i], rng))
            specs.append(RequestSpec(i, prompt, outputs[i], prefix_group=group))
        return specs


@dataclass(frozen=True)
class MultiTurnWorkload:
    num_turns: int
    input_len: LengthDistribution  # each turn's new user message
    output_len: LengthDistribution
    name = "multi-turn"

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        n = _count(num_requests)
        num_conversations = math.ceil(n / self.num_turns)
        inputs, outputs = self.input_len.sample(rng, n), self.output_len.sample(rng, n)
        specs = []
        for i in range(n):  # turn-major: request i is turn i // C of conversation i % C
            turn, conversation = divmod(i, num_conversations)
            specs.append(
                RequestSpec(i, synthesizer.random(inputs[i], rng), outputs[i], conversation=conversation, turn=turn)
            )
        return specs


@dataclass(frozen=True)
class LongContextWorkload:
    input_len: LengthDistribution  # short requests
    long_input_len: LengthDistribution
    output_len: LengthDistribution
    long_fraction: float = DEFAULT_LONG_FRACTION
    name = "long-context"

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        n = _count(num_requests)
        is_long = np.zeros(n, dtype=bool)
        is_long[rng.permutation(n)[: round(n * self.long_fraction)]] = True
        shorts, longs = self.input_len.sample(rng, n), self.long_input_len.sample(rng, n)
        outputs = self.output_len.sample(rng, n)
        return [
            RequestSpec(
                i,
                synthesizer.random(longs[i] if is_long[i] else shorts[i], rng),
                outputs[i],
                tag="long" if is_long[i] else "short",
            )
            for i in range(n)
        ]


@dataclass(frozen=True)
class MultimodalWorkload:
    input_len: LengthDistribution
    output_len: LengthDistribution
    images: ImageConfig
    name = "multimodal"

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        n = _count(num_requests)
        inputs, outputs = self.input_len.sample(rng, n), self.output_len.sample(rng, n)
        pool = ImagePool(self.images, rng)
        return [RequestSpec(i, synthesizer.random(inputs[i], rng), outputs[i], images=pool.draw()) for i in range(n)]


@dataclass(frozen=True)
class TraceWorkload:
    path: str
    time_unit: str = "s"
    speedup: float = 1.0
    block_size: int = DEFAULT_TRACE_BLOCK_SIZE
    name = "trace"

    def build(
        self, num_requests: int | None, synthesizer: PromptSynthesizer, rng: np.random.Generator
    ) -> list[RequestSpec]:
        rows = read_trace(self.path, self.time_unit, self.speedup)[:num_requests]
        blocks: dict[int, list[int]] = {}  # hash id -> its block's token ids
        specs = []
        for i, row in enumerate(rows):
            ids: list[int] = []
            for hash_id in row.hash_ids or ():
                if hash_id not in blocks:
                    blocks[hash_id] = synthesizer.random_ids(self.block_size, rng)
                ids += blocks[hash_id]
            ids = ids[: row.num_input_tokens]
            ids += synthesizer.random_ids(row.num_input_tokens - len(ids), rng)
            specs.append(RequestSpec(i, synthesizer.from_ids(ids), row.num_output_tokens, offset_s=row.offset_s))
        return specs
