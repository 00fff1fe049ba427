"""What the HTTP layer needs from the cluster behind it.

The gateway validates, templates and tokenizes; a Backend places the request on a worker, streams
its deltas back and aborts it on demand. The production implementation is
services.gateway.cluster.ClusterBackend (ZeroMQ to Ray worker actors).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.common.messages import ImageRef, RequestDelta, RequestError, SamplingSpec


class RequestFailed(Exception):
    """The cluster refused or lost a request; carries the OpenAI error fields and HTTP status."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class PromptImage:
    """An image of a vision-language prompt: where its embedding goes, and its encoded bytes for an encoder."""

    ref: ImageRef
    data: bytes


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker's gauges and counters, as the gateway's /metrics exports them."""

    worker: str
    stage: str  # "colocated", "prefill", "decode", "encode"
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    # finished requests' phases (SchedulerStats.phase_seconds): (phase, cumulative buckets, sum s)
    phase_seconds: tuple[tuple[str, tuple[tuple[float, int], ...], float], ...] = ()
    # tokens scheduled per engine step (SchedulerStats.iteration_tokens): cumulative buckets and sum
    iteration_tokens_buckets: tuple[tuple[float, int], ...] = ()
    iteration_tokens_sum: int = 0
    # vllm:cache_config_info's label values (services.common.histogram.cache_config_values); () when unknown
    cache_config: tuple[str, ...] = ()
    # KV transfer (disaggregated workers; zero elsewhere)
    kv_transfer_bytes: int = 0  # sent by a prefill worker
    kv_transfer_failures: int = 0
    kv_transfer_fallbacks: int = 0  # recomputed by a decode worker
    kv_transfer_staging_waits: int = 0  # sent by a prefill worker after waiting for staging room
    kv_transfer_seconds_buckets: tuple[tuple[float, int], ...] = ()  # (upper bound s, cumulative count)
    kv_transfer_seconds_sum: float = 0.0
    kv_transfer_bytes_by_path: tuple[tuple[str, str, int], ...] = ()  # (end, path, bytes): TransferCounters
    # encode workers (zero elsewhere)
    encode_seconds_buckets: tuple[tuple[float, int], ...] = ()  # one batch of images through the tower
    encode_seconds_sum: float = 0.0
    embedding_cache_queries: int = 0  # images looked up
    embedding_cache_hits: int = 0
    embedding_bytes_sent: int = 0  # to prefill (or colocated) workers


@dataclass(frozen=True)
class ClusterStats:
    """Cluster-wide counters of the gateway's backend (router and migrations)."""

    migrations: int = 0
    kv_room_waits: int = 0  # requests that waited for decode KV room (services.gateway.room_queue), ever
    waiting_for_kv_room: int = 0  # ... and waiting now
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (policy, reason) -> placements
    predicted_hit_tokens: int = 0
    observed_hit_tokens: int = 0
    load_imbalance: float = 1.0
    # (stage, worker) -> (restarts so far, crash-looping now): services.gateway.worker_restarts
    worker_restarts: dict[tuple[str, str], tuple[int, bool]] = field(default_factory=dict)


class Backend(Protocol):
    model_name: str  # the served model name
    max_model_len: int  # context length in tokens
    vocab_size: int
    tokenizer: object  # a transformers tokenizer: chat template, tokenization
    # a vision-language model's MultiModalProcessor (chat template, image layout); None: text only
    processor: object | None

    def is_ready(self) -> bool:
        """The backend can serve a request now (GET /ready; the gateway refuses requests with 503 while
        not). For a cluster: at least one engine worker is alive, not every pool (a missing stage degrades
        to whole placements on the survivors)."""
        ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        cache_salt: str | None = None,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request until one with `finished`; raises RequestFailed. `images` go with a
        vision-language prompt whose placeholders `prompt_token_ids` already expand."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request wherever it runs and free what it holds (idempotent)."""
        ...

    async def snapshot(self) -> list[WorkerSnapshot]:
        """Current per-worker gauges (for /metrics)."""
        ...

    def cluster_stats(self) -> ClusterStats:
        """Router and migration counters (for /metrics); cheap, never blocks."""
        ...
