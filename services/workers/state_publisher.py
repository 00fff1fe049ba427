"""A worker's state socket: its KV events, stats and admitted requests, pushed as they happen.

    worker loop turn   ... -> kv_events.append(the turn's events) -> publisher.publish() -> ...
    GenerateRequest    accepted by the loop -> publisher.admitted(message)

    PUB, bound to the worker's configured host (an ephemeral port) ──▶ every gateway's SUB socket

Frames and payloads: services.common.control (StateCodec). `publish()`, once per loop turn:
  1. kv-events        every batch appended to the KVEventLog since the last call, under its log
                      number (vLLM's frames, so vLLM-compatible routers can subscribe);
  2. worker-stats     the worker's WorkerStats when `min_stats_interval_s` has passed since they were
                      last looked at and they changed, or when `heartbeat_interval_s` has passed since
                      the last send whatever they are (a heartbeat);
  3. embedding-cache  an encode worker's cache contents when they changed, at the stats' pace, and
                      with every heartbeat (so a gateway that subscribes late learns them).
`admitted(message)` sends one AdmittedRequest (the prompt's block hashes, as the router hashes them).

Delivery is best effort, and each loss has its recourse: PUB never blocks the loop, and drops what a
subscriber too slow for the high-water mark cannot take (as ZeroMQ drops what a subscriber that
joins late was sent before it joined). A reader that sees a gap in the kv-events numbers, or a
stats message whose next_kv_event_seq is past what it applied, asks the worker for a replay over
Ray; stats are superseded by the next; a lost admitted request leaves another gateway's in-flight
estimate to expire.

The PUB socket is a CURVE server when the worker has the cluster's keys: only members read it.

Ownership: one thread, the worker's loop, calls publish / admitted / close, and so runs the `stats`
callable; the socket has no other user.

Tunables (defaults):
    min_stats_interval_s  0.02   stats (and the embedding cache) looked at and sent at most this often
    heartbeat_interval_s  1.0    stats sent at least this often, changed or not
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import zmq

from services.common.block_hash import MultiModalSpan, hash_request_blocks
from services.common.channels import bind, configure
from services.common.control import (
    ADMITTED_TOPIC,
    EMBEDDING_CACHE_TOPIC,
    KV_EVENTS_TOPIC,
    STATS_TOPIC,
    AdmittedRequest,
    EmbeddingCacheSnapshot,
    StateBody,
    StateCodec,
    WorkerStats,
)
from services.common.messages import GenerateRequest
from services.common.security import CurveKeys
from services.workers.event_log import KVEventLog

logger = logging.getLogger(__name__)

MIN_STATS_INTERVAL_S = 0.02
HEARTBEAT_INTERVAL_S = 1.0


class CacheContents(Protocol):
    """An encode worker's embedding cache, as the publisher reads it (services.workers.encoder.EmbeddingCache)."""

    @property
    def version(self) -> int:
        """Grows with every change of the contents."""
        ...

    def hashes(self) -> list[str]: ...


class StatePublisher:
    def __init__(
        self,
        context: zmq.Context,
        bind_address: str,
        worker: str,
        kv_events: KVEventLog | None,
        stats: Callable[[], WorkerStats],
        *,
        block_size: int | None = None,
        embedding_cache: CacheContents | None = None,
        min_stats_interval_s: float = MIN_STATS_INTERVAL_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        keys: CurveKeys | None = None,
    ) -> None:
        """`bind_address` is a ZeroMQ endpoint on the configured host (`tcp://HOST:0`: a free port);
        `block_size` (tokens per KV block) is needed to hash admitted requests; `kv_events` is None
        for an encode worker, which gives its `embedding_cache` instead; `keys` are the cluster's
        CURVE keys (None: a plain socket)."""
        self.worker = worker
        self.min_stats_interval_s = min_stats_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._kv_events = kv_events
        self._stats = stats
        self._block_size = block_size
        self._embedding_cache = embedding_cache
        self._clock = clock
        self._codec = StateCodec()
        # a PUB socket receives nothing but subscriptions: the default limit is far above any of those
        self._socket = configure(context.socket(zmq.PUB))
        self.address = bind(self._socket, bind_address, keys)
        # batches appended before the publisher existed are not streamed: readers replay them over Ray
        self._next_kv_seq = kv_events.next_seq if kv_events is not None else 0
        self._seqs = {STATS_TOPIC: 0, ADMITTED_TOPIC: 0, EMBEDDING_CACHE_TOPIC: 0}  # next number per topic
        self._last_stats: WorkerStats | None = None
        self._stats_checked_at = float("-inf")
        self._heartbeat_at = float("-inf")  # when stats were last sent
        self._cache_version: int | None = None  # of the embedding cache contents last sent

    # ------------------------------------------------------------------ the loop's calls

    def publish(self) -> None:
        """New KV event batches now; stats and the embedding cache when due. Never blocks."""
        self._publish_kv_events()
        now = self._clock()
        if now - self._stats_checked_at < self.min_stats_interval_s:
            return
        self._stats_checked_at = now
        heartbeat = now - self._heartbeat_at >= self.heartbeat_interval_s
        stats = self._stats()
        if heartbeat or stats != self._last_stats:
            self._send_numbered(STATS_TOPIC, stats)
            self._last_stats = stats
            if heartbeat:
                self._heartbeat_at = now
        self._publish_embedding_cache(force=heartbeat)

    def admitted(self, message: GenerateRequest) -> None:
        """The loop took `message`: tell every gateway (one that did not place it counts it too)."""
        if self._block_size is None:
            raise ValueError("a publisher without block_size cannot hash requests")
        spans = [MultiModalSpan(i.content_hash, i.offset, i.length) for i in message.images]
        block_hashes = hash_request_blocks(message.prompt_token_ids, self._block_size, message.cache_salt, spans)
        decode_worker = message.kv_target.worker if message.kv_target is not None else None
        self._send_numbered(
            ADMITTED_TOPIC,
            AdmittedRequest(
                worker=self.worker,
                request_id=message.request_id,
                reply_to=message.reply_to,
                num_prompt_tokens=len(message.prompt_token_ids),
                block_hashes=block_hashes,
                decode_worker=decode_worker,
                max_tokens=message.sampling.max_tokens,
            ),
        )

    def close(self) -> None:
        self._socket.close(linger=0)

    # ------------------------------------------------------------------ topics

    def _publish_kv_events(self) -> None:
        log = self._kv_events
        if log is None or log.next_seq == self._next_kv_seq:
            return
        first, batches = log.batches_from(self._next_kv_seq)  # first > _next_kv_seq: the log dropped some
        for offset, batch in enumerate(batches):
            self._send(KV_EVENTS_TOPIC, first + offset, batch)
        self._next_kv_seq = first + len(batches)

    def _publish_embedding_cache(self, force: bool) -> None:
        cache = self._embedding_cache
        if cache is None or (not force and cache.version == self._cache_version):
            return
        self._cache_version = cache.version
        self._send_numbered(
            EMBEDDING_CACHE_TOPIC, EmbeddingCacheSnapshot(seq=cache.version, content_hashes=cache.hashes())
        )

    def _send_numbered(self, topic: bytes, body: StateBody) -> None:
        seq = self._seqs[topic]
        self._seqs[topic] = seq + 1
        self._send(topic, seq, body)

    def _send(self, topic: bytes, seq: int, body: StateBody) -> None:
        try:
            self._socket.send_multipart(self._codec.encode(topic, seq, body), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # PUB drops rather than blocks; anything else must not stop the loop
            logger.warning("%s could not publish on %s: %s", self.worker, topic.decode(), exc)
