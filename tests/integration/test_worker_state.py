"""Workers push their load as it changes, and the gateway's router places by it.

Two colocated workers of the tiny default model (`tristage serve --mode colocated --replicas 2`, pools
shared through a Ray cluster), two gateways attached to them, one per policy (least_load, preble).
The test joins the same Ray cluster to read the workers' typed info (over Ray, pickled msgspec
structs) and talks to the workers directly over their ZeroMQ sockets, as another gateway would:

    colocated-0  a backlog of long prompts sent straight to its input socket (no gateway placed them):
                 at most 2 running (max_num_seqs), the rest waiting; its state socket reports the
                 waiting requests and their prompt tokens within a second
    colocated-1  two long decodes: at least as many running (and decoding) requests as colocated-0

Then one short request through each gateway, sharing no prefix with anything cached, must go to
colocated-1. By running or decoding requests alone colocated-0 costs no more (and a tie goes to it,
the first candidate): only its queued prefill tokens tell the policies to go elsewhere.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import openai
import pytest
import ray
import zmq

from services.common.channels import bind, configure
from services.common.codec import MessageCodec
from services.common.control import (
    ADMITTED_TOPIC,
    STATE_TOPICS,
    STATS_TOPIC,
    AdmittedRequest,
    StateCodec,
    StateMessage,
    WorkerInfo,
    WorkerStats,
)
from services.common.messages import AbortRequest, DataPlanePeers, GenerateRequest, SamplingSpec, WorkerInbound
from services.serve import _use_ray_auth_token
from services.workers.pool import RAY_NAMESPACE
from tests.integration.cluster import ServeProcess
from tests.integration.test_gateway_replicas import ray_cluster  # noqa: F401  (a fixture)

MODEL = "tristage-tiny"
MAX_NUM_SEQS = 2
BACKLOG_REQUESTS, BACKLOG_PROMPT_TOKENS, BACKLOG_MAX_TOKENS = 12, 1500, 300
BUSY_REQUESTS, BUSY_PROMPT_TOKENS, BUSY_MAX_TOKENS = 2, 64, 1500
NUM_WAITING = BACKLOG_REQUESTS - MAX_NUM_SEQS  # at least, once the backlog is in (a step may start fewer)
REPORT_WITHIN_S = 1.0


class WorkerLink:
    """The test's own connection to one worker: its input socket, and its state socket subscribed."""

    def __init__(self, context: zmq.Context, info: WorkerInfo) -> None:
        self.info = info
        self.input = configure(context.socket(zmq.PUSH))
        self.input.connect(info.input_address)
        self.state = configure(context.socket(zmq.SUB))
        for topic in STATE_TOPICS:
            self.state.setsockopt(zmq.SUBSCRIBE, topic)
        self.state.connect(info.state_address)
        self.codec = StateCodec()
        self.outbound = MessageCodec(WorkerInbound)
        self.admitted: list[AdmittedRequest] = []  # every one seen, whoever sent the request

    def send(self, message: GenerateRequest | AbortRequest) -> None:
        self.input.send_multipart(self.outbound.encode(message))

    def wait_for_stats(self, accept: Callable[[WorkerStats], bool], timeout_s: float) -> WorkerStats:
        """The first stats message that `accept`s, reading (and keeping admitted requests) on the way."""
        deadline = time.monotonic() + timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not self.state.poll(left_ms):
                break
            message = self._receive()
            if message.topic == STATS_TOPIC and accept(message.body):
                return message.body
        raise AssertionError(f"{self.info.name} reported no such stats within {timeout_s} s")

    def read_for(self, duration_s: float) -> None:
        """Every message that arrives for `duration_s` (stats flow all the time while it works)."""
        deadline = time.monotonic() + duration_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if self.state.poll(left_ms):
                self._receive()

    def _receive(self) -> StateMessage:
        message = self.codec.decode(self.state.recv_multipart())
        if message.topic == ADMITTED_TOPIC:
            self.admitted.append(message.body)
        return message

    def close(self) -> None:
        self.input.close(linger=0)
        self.state.close(linger=0)


class ReplySink:
    """Where the test's own requests stream their tokens: read and dropped by one thread (which owns the
    socket), so the workers' sends never fill a queue."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._bound = threading.Event()
        self.address = ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(10)

    def _run(self) -> None:
        context = zmq.Context()
        socket = configure(context.socket(zmq.PULL))
        self.address = bind(socket, "tcp://127.0.0.1:0")
        self._bound.set()
        while not self._stop.is_set():
            if socket.poll(50):
                socket.recv_multipart()
        socket.close(linger=0)
        context.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def gateways(ray_cluster, tmp_path):  # noqa: F811
    # a step's token budget of 512: a worker reports at the end of each loop turn, so its steps bound how
    # fresh its reports are (on a shared two-core machine a 2048-token prefill step takes half a second)
    args = (
        "--ray-address",
        ray_cluster,
        "--mode",
        "colocated",
        "--replicas",
        "2",
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-num-batched-tokens",
        "512",
        "--drain-timeout",
        "5",
    )
    started: dict[str, ServeProcess] = {}
    try:
        for policy in ("least_load", "preble"):  # the first starts the pools, the second attaches to them
            started[policy] = ServeProcess(
                *args, "--router-policy", policy, cache_dir=tmp_path / "cache", startup_timeout_s=180
            )
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


@pytest.fixture
def workers(ray_cluster, gateways):  # noqa: F811
    _use_ray_auth_token()
    ray.init(address=ray_cluster, namespace=RAY_NAMESPACE, logging_level="WARNING", log_to_driver=False)
    context = zmq.Context()
    links = []
    try:
        for name in ("colocated-0", "colocated-1"):
            info = ray.get(ray.get_actor(name).info.remote())
            assert isinstance(info, WorkerInfo) and info.engine is not None  # typed across processes
            links.append(WorkerLink(context, info))
        yield links
    finally:
        for link in links:
            link.close()
        context.destroy(linger=0)
        ray.shutdown()


def test_a_backlogged_worker_reports_its_queue_within_a_second_and_both_policies_place_elsewhere(gateways, workers):
    backlogged, other = workers
    replies = ReplySink()
    reply_to = replies.address
    for link in workers:  # as another gateway does: its results address, registered over Ray
        ray.get(ray.get_actor(link.info.name).register_peers.remote(DataPlanePeers(reply_address=reply_to)))
    vocab_size = backlogged.info.engine.vocab_size
    rng = random.Random(0)

    def prompt(num_tokens: int) -> list[int]:  # random ids: no prefix shared with anything cached
        return [rng.randrange(10, vocab_size) for _ in range(num_tokens)]

    try:
        # warm-up: the first prompt of this length through a fresh worker pays one-off costs (allocations)
        backlogged.send(
            GenerateRequest(
                request_id="warm-up",
                prompt_token_ids=prompt(BACKLOG_PROMPT_TOKENS),
                sampling=SamplingSpec(max_tokens=1),
                reply_to=reply_to,
            )
        )
        backlogged.wait_for_stats(
            lambda s: s.scheduler.prefix_cache_queried_tokens > 0 and s.num_running == 0, timeout_s=30
        )
        backlogged.admitted.clear()
        for policy, gateway in gateways.items():
            ids = []
            for i in range(BUSY_REQUESTS):
                ids.append(f"{policy}-busy-{i}")
                other.send(
                    GenerateRequest(
                        request_id=ids[-1],
                        prompt_token_ids=prompt(BUSY_PROMPT_TOKENS),
                        sampling=SamplingSpec(max_tokens=BUSY_MAX_TOKENS, ignore_eos=True),
                        reply_to=reply_to,
                    )
                )
            other.wait_for_stats(lambda s: s.scheduler.num_decoding_requests == BUSY_REQUESTS, timeout_s=30)
            sent_at = time.monotonic()
            for i in range(BACKLOG_REQUESTS):
                ids.append(f"{policy}-backlog-{i}")
                backlogged.send(
                    GenerateRequest(
                        request_id=ids[-1],
                        prompt_token_ids=prompt(BACKLOG_PROMPT_TOKENS),
                        sampling=SamplingSpec(max_tokens=BACKLOG_MAX_TOKENS, ignore_eos=True),
                        reply_to=reply_to,
                    )
                )
            stats = backlogged.wait_for_stats(
                lambda s: (
                    s.scheduler.num_waiting_requests >= NUM_WAITING
                    and s.scheduler.queued_prefill_tokens >= NUM_WAITING * BACKLOG_PROMPT_TOKENS
                ),
                timeout_s=REPORT_WITHIN_S,
            )
            reported_s = time.monotonic() - sent_at
            assert reported_s < REPORT_WITHIN_S, (policy, reported_s, stats)
            assert stats.scheduler.num_running_requests + stats.scheduler.num_waiting_requests == BACKLOG_REQUESTS
            assert other.wait_for_stats(lambda s: True, timeout_s=2).scheduler.num_running_requests == BUSY_REQUESTS
            time.sleep(0.2)  # the gateways' subscribers have the same messages by now

            client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            reply = client.completions.create(model=MODEL, prompt=prompt(24), max_tokens=1)
            assert reply.usage.completion_tokens == 1
            for link in workers:
                link.read_for(0.5)
            placed = [
                (link.info.name, a.request_id) for link in workers for a in link.admitted if a.request_id not in ids
            ]
            assert [name for name, _ in placed] == ["colocated-1"], (policy, placed)

            for link in workers:  # clean up for the next policy
                for request_id in ids:
                    link.send(AbortRequest(request_id=request_id))
                link.wait_for_stats(lambda s: s.num_running == s.num_waiting == 0, timeout_s=30)
                link.admitted.clear()
    finally:
        replies.close()
