"""What the gateway does with a worker's state: its KV event batches in order, its stats as router load
and as /metrics values.

The stream itself (one SUB socket per worker, read by one asyncio task) lives in
services.gateway.cluster; frames and payloads are services.common.control's.

KVEventFeed keeps one worker's KV event batches flowing into the router's PrefixIndex in order, across
the stream's gaps and the worker's restarts:

    stream   40 41 [42 lost] 43 44 45 ...              replay: the worker's batches from 42 on (or a
    index    40 41 · · · · · · · · · · · 42 43 44 45    snapshot as of S, then S + 1 on), over Ray
                    └ 43 is early: held ┘  applied after the replay, the held ones past it

`next_seq` is the batch the index takes next; None (a new feed, or after `reset`) until a replay has
set it. A batch that comes early (a gap) or while a replay is outstanding is held (at most max_held,
oldest dropped first: at worst one more replay); a worker's stats that name a `next_kv_event_seq`
past next_seq also show a gap (the last batches of a burst lost, or a reader that joined late).
`wants_replay` then asks the owner to call the worker's `kv_events(next_seq)`; its answer goes to
`on_reply`, which installs it and applies the held batches that follow. Each replay carries a token:
an answer from before a `reset` (the worker restarted meanwhile) is ignored.

Not thread-safe: one owner, the gateway's event loop.

Tunables (defaults):
    max_held = 4096   batches held while a replay is outstanding (a worker's whole event log)
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from services.common.control import KVEventReplay, KVEventsReply, WorkerStats
from services.common.histogram import cache_config_values
from services.common.kv_events import KVEvent
from services.gateway.backend import WorkerSnapshot
from services.router import PrefixIndex, WorkerLoad

MAX_HELD_BATCHES = 4096


class KVEventFeed:
    def __init__(self, worker: str, index: PrefixIndex, max_held: int = MAX_HELD_BATCHES) -> None:
        self.worker = worker
        self._index = index
        self.next_seq: int | None = None
        self.replay_outstanding = False
        self._held: deque[tuple[int, list[KVEvent]]] = deque(maxlen=max_held)
        self._behind = False  # a gap was seen: batches the index needs are missing
        self._token = 0  # numbers replays; reset() moves it on, so an older answer is ignored

    @property
    def wants_replay(self) -> bool:
        return not self.replay_outstanding and (self.next_seq is None or self._behind)

    def on_batch(self, seq: int, events: list[KVEvent]) -> None:
        """A batch from the stream: applied in order, dropped if already applied, else held."""
        if self.next_seq is None or self.replay_outstanding:
            self._held.append((seq, events))
        elif seq < self.next_seq:
            return
        elif seq > self.next_seq:
            self._held.append((seq, events))
            self._behind = True
        else:
            self._apply(seq, events)

    def on_worker_next_seq(self, worker_next_seq: int) -> None:
        """The worker's next batch number, from stats that followed every batch below it on the stream."""
        if self.next_seq is None or self.next_seq < worker_next_seq:
            self._behind = True

    def start_replay(self) -> tuple[int | None, int]:
        """(the batch to ask the worker's kv_events for, this replay's token)."""
        self.replay_outstanding = True
        return self.next_seq, self._token

    def on_reply(self, reply: KVEventsReply, token: int) -> None:
        """Install the worker's answer, then the held batches that follow it."""
        if token != self._token:
            return
        self.replay_outstanding, self._behind = False, False
        if isinstance(reply, KVEventReplay):
            for offset, batch in enumerate(reply.batches):
                self.on_batch(reply.first_seq + offset, batch.events)
        else:
            self._index.replace_worker(
                self.worker,
                reply.seq,
                ((h, None) for h in reply.block_hashes),
                host_block_hashes=reply.host_block_hashes,
            )
            self.next_seq = reply.seq + 1
        held, self._held = self._held, deque(maxlen=self._held.maxlen)
        for seq, events in held:
            self.on_batch(seq, events)

    def on_replay_failed(self, token: int) -> None:
        if token == self._token:
            self.replay_outstanding = False

    def reset(self) -> None:
        """The worker left or restarted: nothing it sent before counts (the owner clears the index)."""
        self._token += 1
        self.next_seq, self.replay_outstanding, self._behind = None, False, False
        self._held.clear()

    def _apply(self, seq: int, events: list[KVEvent]) -> None:
        if self._index.apply(self.worker, seq, events):
            self.next_seq = seq + 1
        else:  # the index expects another number (it forgot the worker): start over from a snapshot
            self.next_seq, self._behind = None, True


# ----------------------------------------------------------------------------------------------
# Stats as the router and /metrics read them


def worker_load(stats: WorkerStats) -> WorkerLoad:
    """The router's view of a worker's load: an engine's queues and device KV, or an encoder's images."""
    scheduler = stats.scheduler
    if scheduler is None:  # an encode worker: images queued and in the tower, no KV
        return WorkerLoad(
            worker=stats.name,
            stage=stats.stage,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_usage=0.0,
            num_free_blocks=0,
            queued_prefill_tokens=0,
            num_decoding=0,
        )
    return WorkerLoad(
        worker=stats.name,
        stage=stats.stage,
        num_running=scheduler.num_running_requests,
        num_waiting=scheduler.num_waiting_requests,
        kv_usage=scheduler.kv_cache_usage,
        num_free_blocks=scheduler.device_kv.num_free_blocks,
        queued_prefill_tokens=scheduler.queued_prefill_tokens,
        num_decoding=scheduler.num_decoding_requests,
        num_total_blocks=scheduler.device_kv.num_total_blocks,
        recent_steps=tuple(scheduler.recent_steps),
        recent_finished=tuple(scheduler.recent_finished),
    )


def worker_snapshot(stats: WorkerStats) -> WorkerSnapshot:
    """The gauges and counters /metrics exports for a worker (zero where its role has none)."""
    scheduler, transfer, encode = stats.scheduler, stats.transfer, stats.encode
    snapshot = WorkerSnapshot(
        worker=stats.name,
        stage=stats.stage,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        kv_cache_usage=scheduler.kv_cache_usage if scheduler else 0.0,
        num_preemptions=scheduler.num_preemptions if scheduler else 0,
        prefix_cache_queried_tokens=scheduler.prefix_cache_queried_tokens if scheduler else 0,
        prefix_cache_hit_tokens=scheduler.prefix_cache_hit_tokens if scheduler else 0,
        phase_seconds=tuple(
            (phase, tuple(snapshot.buckets), snapshot.sum_s) for phase, snapshot in scheduler.phase_seconds.items()
        )
        if scheduler
        else (),
    )
    if scheduler is not None and scheduler.iteration_tokens is not None:
        snapshot = replace(
            snapshot,
            iteration_tokens_buckets=tuple(scheduler.iteration_tokens.buckets),
            iteration_tokens_sum=scheduler.iteration_tokens.sum_tokens,
        )
    if scheduler is not None and scheduler.cache_config is not None:
        snapshot = replace(snapshot, cache_config=tuple(cache_config_values(scheduler.cache_config)))
    if transfer is not None:
        snapshot = replace(
            snapshot,
            kv_transfer_bytes=transfer.bytes_sent,
            kv_transfer_failures=transfer.num_failures,
            kv_transfer_fallbacks=transfer.num_fallbacks,
            kv_transfer_staging_waits=transfer.num_staging_waits,
            kv_transfer_seconds_buckets=tuple(transfer.seconds.buckets),
            kv_transfer_seconds_sum=transfer.seconds.sum_s,
            kv_transfer_bytes_by_path=tuple(transfer.bytes_by_path()),
        )
    if encode is not None:
        snapshot = replace(
            snapshot,
            encode_seconds_buckets=tuple(encode.encode_seconds.buckets),
            encode_seconds_sum=encode.encode_seconds.sum_s,
            embedding_cache_queries=encode.embedding_cache_queries,
            embedding_cache_hits=encode.embedding_cache_hits,
            embedding_bytes_sent=encode.embedding_bytes_sent,
        )
    return snapshot
