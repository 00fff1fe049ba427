"""A worker's state socket over a real PUB/SUB pair on loopback: KV event batches under their log
numbers, a reader that missed some replaying them from the log, the stats' pace, admitted requests
and an encoder's cache contents."""

from __future__ import annotations

import pytest
import zmq

from services.common.block_hash import MultiModalSpan, hash_request_blocks
from services.common.channels import configure
from services.common.control import (
    ADMITTED_TOPIC,
    EMBEDDING_CACHE_TOPIC,
    KV_EVENTS_TOPIC,
    STATE_TOPICS,
    STATS_TOPIC,
    AdmittedRequest,
    EmbeddingCacheSnapshot,
    KVEventReplay,
    KVEventSnapshot,
    KVTierStats,
    SchedulerStats,
    StateCodec,
    StateMessage,
    WorkerStats,
)
from services.common.kv_events import BlockRemoved, BlockStored
from services.common.messages import GenerateRequest, ImageRef, KVTarget, SamplingSpec
from services.gateway.worker_state import KVEventFeed
from services.router import PrefixIndex
from services.workers.event_log import KVEventLog
from services.workers.state_publisher import StatePublisher
from tests.unit.router_fixtures import Clock

BLOCK = 4
QUIET_MS = 150  # how long "nothing more arrives" is waited for


class Subscriber:
    """A gateway's side: one SUB socket on the publisher's address, every topic."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self.socket = configure(context.socket(zmq.SUB))
        for topic in STATE_TOPICS:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(address)
        self.codec = StateCodec()

    def receive(self, timeout_ms: int = 2000) -> StateMessage:
        assert self.socket.poll(timeout_ms), "no state message arrived"
        return self.codec.decode(self.socket.recv_multipart())

    def receive_all(self) -> list[StateMessage]:
        """Every message until none arrives for QUIET_MS."""
        messages = []
        while self.socket.poll(QUIET_MS):
            messages.append(self.codec.decode(self.socket.recv_multipart()))
        return messages


class Worker:
    """What the publisher reads: a KV event log, mutable stats, a clock the test moves."""

    def __init__(self, context: zmq.Context, *, with_log: bool = True, embedding_cache=None) -> None:
        self.clock = Clock()
        self.log = KVEventLog(self.cached_hashes, clock=lambda: 1.0) if with_log else None
        self.cached: set[int] = set()
        self.num_waiting = 0
        self.publisher = StatePublisher(
            context,
            "tcp://127.0.0.1:0",
            "w0",
            self.log,
            self.stats,
            block_size=BLOCK,
            embedding_cache=embedding_cache,
            clock=self.clock,
        )

    def cached_hashes(self) -> list[int]:
        return sorted(self.cached)

    def stats(self) -> WorkerStats:
        scheduler = SchedulerStats(
            num_running_requests=0,
            num_waiting_requests=self.num_waiting,
            num_decoding_requests=0,
            queued_prefill_tokens=100 * self.num_waiting,
            kv_tiers=[KVTierStats(tier="device", num_free_blocks=10, num_total_blocks=10)],
            num_preemptions=0,
            prefix_cache_queried_tokens=0,
            prefix_cache_hit_tokens=0,
        )
        return WorkerStats(
            name="w0",
            stage="colocated",
            alive=True,
            scheduler=scheduler,
            next_kv_event_seq=self.log.next_seq if self.log is not None else None,
        )

    def store(self, *block_hashes: int) -> None:
        """One loop turn that cached these blocks: logged, then published."""
        self.cached.update(block_hashes)
        self.log.append([BlockStored(list(block_hashes), None, [0] * BLOCK * len(block_hashes), BLOCK)])
        self.publisher.publish()

    def join(self, subscriber: Subscriber) -> None:
        """Heartbeats until the subscriber receives one (ZeroMQ's subscription takes a moment to reach the
        publisher; until then what is sent is not for it), then a quiet publisher."""
        for _ in range(200):
            self.clock.now += 1.0
            self.publisher.publish()
            if subscriber.socket.poll(10):
                break
        else:
            raise AssertionError("the subscriber never received a heartbeat")
        subscriber.receive_all()


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_kv_event_batches_stream_under_their_log_numbers(context):
    worker = Worker(context)
    assert worker.publisher.address.startswith("tcp://127.0.0.1:")  # the configured host, never every interface
    subscriber = Subscriber(context, worker.publisher.address)
    worker.join(subscriber)
    worker.log.append([BlockStored([1], None, [0] * BLOCK, BLOCK)])
    worker.log.append([BlockRemoved([1])])  # two batches in one turn
    worker.publisher.publish()
    worker.store(2)
    worker.publisher.publish()  # nothing new: nothing sent
    kv = [(m.seq, m.body.events) for m in subscriber.receive_all() if m.topic == KV_EVENTS_TOPIC]
    assert kv == [
        (0, [BlockStored([1], None, [0] * BLOCK, BLOCK)]),
        (1, [BlockRemoved([1])]),
        (2, [BlockStored([2], None, [0] * BLOCK, BLOCK)]),
    ]
    worker.publisher.close()


def test_a_reader_that_missed_batches_asks_for_a_replay_and_ends_with_the_workers_blocks(context):
    worker = Worker(context)
    worker.store(10, 11)  # batch 0: before anyone subscribed, so nobody receives it
    subscriber = Subscriber(context, worker.publisher.address)
    index = PrefixIndex()
    feed = KVEventFeed("w0", index)

    def deliver(messages: list[StateMessage], skip_seq: int | None = None) -> None:
        for m in messages:
            if m.topic == KV_EVENTS_TOPIC and m.seq != skip_seq:
                feed.on_batch(m.seq, m.body.events)
            elif m.topic == STATS_TOPIC:
                feed.on_worker_next_seq(m.body.next_kv_event_seq)

    def replay() -> None:  # the gateway's call to the worker's kv_events over Ray
        assert feed.wants_replay
        next_seq, token = feed.start_replay()
        feed.on_reply(worker.log.read(next_seq), token)

    worker.join(subscriber)  # its heartbeat says batch 1 is next: the reader missed batch 0
    feed.on_worker_next_seq(worker.log.next_seq)
    assert (
        feed.wants_replay
        and feed.start_replay() == (None, 0)
        and worker.log.read(None) == KVEventSnapshot(seq=0, block_hashes=[10, 11])
    )
    feed.on_reply(worker.log.read(None), 0)
    assert (feed.next_seq, index.blocks("w0")) == (1, {10, 11})
    worker.store(12)  # batch 1: applied as it comes
    deliver(subscriber.receive_all())
    assert (feed.next_seq, feed.wants_replay, index.blocks("w0")) == (2, False, {10, 11, 12})
    worker.store(13)  # batch 2: lost on the way
    worker.store(14)  # batch 3: early, held; the gap asks for a replay from 2
    deliver(subscriber.receive_all(), skip_seq=2)
    assert feed.wants_replay and feed.next_seq == 2
    reply = worker.log.read(2)
    assert isinstance(reply, KVEventReplay) and reply.first_seq == 2 and len(reply.batches) == 2
    replay()
    assert (feed.next_seq, feed.wants_replay, index.blocks("w0")) == (4, False, {10, 11, 12, 13, 14})
    worker.store(15)  # batch 4, then the last batch of a burst lost: the stats after it show the gap
    worker.store(16)
    deliver(subscriber.receive_all(), skip_seq=5)
    worker.clock.now += 1.0  # a heartbeat
    worker.publisher.publish()
    deliver(subscriber.receive_all())
    replay()
    assert (feed.next_seq, index.blocks("w0")) == (6, set(worker.cached))
    worker.publisher.close()


def test_stats_go_out_on_change_at_most_every_20_ms_and_at_least_every_second(context):
    worker = Worker(context, with_log=False)
    subscriber = Subscriber(context, worker.publisher.address)
    worker.join(subscriber)
    start = worker.clock.now

    def stats_sent_at(now: float, num_waiting: int | None = None) -> bool:
        worker.clock.now = start + now
        if num_waiting is not None:
            worker.num_waiting = num_waiting
        worker.publisher.publish()
        return [m.topic for m in subscriber.receive_all()] == [STATS_TOPIC]

    assert not stats_sent_at(0.005, num_waiting=1)  # changed, but 5 ms after the last look
    assert stats_sent_at(0.021)  # 21 ms: the change goes out
    assert not stats_sent_at(0.030, num_waiting=2)
    assert stats_sent_at(0.045)
    assert not stats_sent_at(0.500)  # unchanged
    assert not stats_sent_at(0.999)
    assert stats_sent_at(1.046)  # unchanged, but a second since the heartbeat before: a heartbeat
    assert not stats_sent_at(1.500)
    worker.publisher.close()


def test_an_admitted_request_carries_the_prompts_block_hashes_as_the_router_computes_them(context):
    worker = Worker(context)
    subscriber = Subscriber(context, worker.publisher.address)
    worker.join(subscriber)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks of 4
    image = ImageRef(content_hash="c0ffee", offset=5, length=2)
    worker.publisher.admitted(
        GenerateRequest(
            request_id="req-1",
            prompt_token_ids=prompt,
            sampling=SamplingSpec(),
            reply_to="tcp://127.0.0.1:7000",
            cache_salt="tenant-a",
            images=[image],
        )
    )  # max_tokens: SamplingSpec's default, 16
    worker.publisher.admitted(
        GenerateRequest(
            request_id="req-2",
            prompt_token_ids=prompt[:4],
            sampling=SamplingSpec(max_tokens=None),
            reply_to="tcp://127.0.0.1:7000",
            kv_target=KVTarget(worker="decode-3", kv_address="tcp://127.0.0.1:7001"),
        )
    )
    message, second = subscriber.receive_all()
    expected = hash_request_blocks(prompt, BLOCK, "tenant-a", [MultiModalSpan("c0ffee", 5, 2)])
    assert len(expected) == 2 and expected != hash_request_blocks(prompt, BLOCK)  # salt and image enter the chain
    assert (message.topic, message.seq) == (ADMITTED_TOPIC, 0)
    assert message.body == AdmittedRequest(
        worker="w0",
        request_id="req-1",
        reply_to="tcp://127.0.0.1:7000",
        num_prompt_tokens=11,
        block_hashes=expected,
        max_tokens=16,
    )
    assert (second.seq, second.body.decode_worker, second.body.max_tokens) == (1, "decode-3", None)
    assert second.body.block_hashes == hash_request_blocks(prompt[:4], BLOCK)
    worker.publisher.close()


class FakeCache:
    def __init__(self) -> None:
        self.version = 0
        self.contents: list[str] = []

    def hashes(self) -> list[str]:
        return list(self.contents)


def test_an_encoders_cache_contents_go_out_when_they_change_and_with_each_heartbeat(context):
    cache = FakeCache()
    worker = Worker(context, with_log=False, embedding_cache=cache)
    subscriber = Subscriber(context, worker.publisher.address)
    worker.join(subscriber)
    start = worker.clock.now

    def snapshots_at(now: float) -> list[EmbeddingCacheSnapshot]:
        worker.clock.now = start + now
        worker.publisher.publish()
        return [m.body for m in subscriber.receive_all() if m.topic == EMBEDDING_CACHE_TOPIC]

    cache.version, cache.contents = 1, ["aa", "bb"]
    assert snapshots_at(0.025) == [EmbeddingCacheSnapshot(seq=1, content_hashes=["aa", "bb"])]
    assert snapshots_at(0.050) == []  # unchanged
    assert snapshots_at(1.030) == [EmbeddingCacheSnapshot(seq=1, content_hashes=["aa", "bb"])]  # heartbeat
    worker.publisher.close()


def test_a_replay_answered_after_the_worker_restarted_is_ignored():
    index = PrefixIndex()
    feed = KVEventFeed("w0", index)
    feed.on_batch(0, [BlockStored([1], None, [0] * BLOCK, BLOCK)])  # a new feed holds it: it needs a snapshot
    next_seq, token = feed.start_replay()
    assert (next_seq, feed.wants_replay) == (None, False)  # one replay at a time
    feed.reset()  # the worker restarted meanwhile: the answer describes its old process
    feed.on_reply(KVEventSnapshot(seq=0, block_hashes=[1]), token)
    assert (feed.next_seq, feed.wants_replay, index.blocks("w0")) == (None, True, frozenset())
    next_seq, token = feed.start_replay()
    feed.on_reply(KVEventSnapshot(seq=-1, block_hashes=[]), token)  # the new process has stored nothing yet
    feed.on_batch(0, [BlockStored([7], None, [0] * BLOCK, BLOCK)])
    assert (feed.next_seq, feed.wants_replay, index.blocks("w0")) == (1, False, {7})
