"""Back-pressure from prefill progress, over real sockets on loopback (no Ray) with a tiny random VLM: a
prefill worker whose engine starts nothing takes embeddings until max_ready_image_tokens of image prompts
wait for their first step (services.workers.image_intake); then its socket fills, each encoder's sends to it
fill, the encoders start no more of its images, their queues fill and they stop taking work
(services.workers.encode_worker). An abort of a waiting request frees its share; once the engine steps again
every request completes, split over two encoders or not, and every count returns to zero. An encoder keeps
serving other destinations while one is held, and gives up a destination that takes nothing for long.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable

import pytest
import torch
import zmq

from services.common.channels import bind, configure, connect
from services.common.codec import MessageCodec
from services.common.messages import (
    AbortRequest,
    DataPlanePeers,
    EmbeddingInbound,
    EncodeRequest,
    EncoderInbound,
    GenerateRequest,
    OutputBatch,
    RequestDelta,
    RequestError,
    SamplingSpec,
    WorkerInbound,
)
from services.engine import LLMEngine
from services.engine.multimodal import MultiModalProcessor
from services.engine.outputs import StepOutputs
from services.workers.encode_worker import EncodeWorker
from services.workers.encoder import ImageEncoder
from services.workers.engine_worker import EngineWorker
from services.workers.wire import MAX_EMBEDDING_MESSAGE_BYTES
from tests.unit.test_encode_pipeline import gateway_refs
from tests.unit.test_encode_worker import Link, image_ref, png

LLAVA = "llava-clip-llama"
MAX_TOKENS = 2
NUM_REQUESTS = 100  # two images each, one per encoder: about three times what an encoder takes before it stops
SETTLE_S = 0.3


class PausableEngine:
    """The engine's step, paused on demand: while paused it starts nothing (every request stays waiting)."""

    def __init__(self, engine: LLMEngine) -> None:
        self._step = engine.step
        self.paused = threading.Event()
        engine.step = self.step  # type: ignore[method-assign]

    def step(self) -> StepOutputs:
        if self.paused.is_set():
            time.sleep(0.002)
            return StepOutputs()
        return self._step()


class PrefillWithEncoders:
    """A prefill worker (its embedding socket on ipc, to keep the kernel's buffering small: TCP autotunes it
    to megabytes) and two encode workers, and the gateway's sockets to all three."""

    def __init__(self, model_dir: str, sockets: str, max_ready_image_tokens: int) -> None:
        self.engine = LLMEngine(model=model_dir, block_size=8, num_kv_blocks=256)
        self.pausable = PausableEngine(self.engine)
        self.worker = EngineWorker(
            self.engine,
            "tcp://127.0.0.1:0",
            "prefill-0",
            role="prefill",
            embedding_address=f"ipc://{sockets}/embeddings",
            max_ready_image_tokens=max_ready_image_tokens,
        )
        self.encoders = [
            EncodeWorker(
                ImageEncoder(model_dir, "cpu", torch.float32), "tcp://127.0.0.1:0", f"encoder-{i}", max_batch_images=2
            )
            for i in range(2)
        ]
        self.processor = self.encoders[0].encoder.processor
        self.context = zmq.Context()
        self.results = configure(self.context.socket(zmq.PULL))
        self.reply_to = bind(self.results, "tcp://127.0.0.1:0")
        peers = DataPlanePeers(reply_address=self.reply_to, embedding_addresses=[self.worker.embedding_address or ""])
        for w in (self.worker, *self.encoders):
            w.peers.register(peers)
        self.to_worker = connect(configure(self.context.socket(zmq.PUSH)), self.worker.input_address)
        self.to_encoders = [connect(configure(self.context.socket(zmq.PUSH)), e.input_address) for e in self.encoders]
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in (self.worker, *self.encoders)]
        for thread in self.threads:
            thread.start()

    def send_requests(self, request_ids: list[str], datas: list[bytes]) -> None:
        """Each request to the prefill worker, then its images, image i to encoder i (as the router spreads them)."""
        token_ids, refs = gateway_refs(self.processor, datas)
        sampling = SamplingSpec(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for request_id in request_ids:
            message = GenerateRequest(
                request_id=request_id,
                prompt_token_ids=token_ids,
                sampling=sampling,
                reply_to=self.reply_to,
                images=refs,
            )
            self.to_worker.send_multipart(MessageCodec(WorkerInbound).encode(message))
        time.sleep(SETTLE_S)  # every request parked before its images arrive, as when encoding takes time
        for request_id in request_ids:
            for socket, ref, data in zip(self.to_encoders, refs, datas):
                request = EncodeRequest(
                    request_id=request_id, image=ref, deliver_to=self.worker.embedding_address or ""
                )
                socket.send_multipart(MessageCodec(EncoderInbound).encode(request, data))

    def abort(self, request_id: str) -> None:
        self.to_worker.send_multipart(MessageCodec(WorkerInbound).encode(AbortRequest(request_id=request_id)))

    def outcomes(self, request_ids: list[str]) -> dict[str, list[int] | RequestError]:
        """Each request's tokens once finished, or its error."""
        tokens: dict[str, list[int]] = {r: [] for r in request_ids}
        done: dict[str, list[int] | RequestError] = {}
        while len(done) < len(request_ids):
            assert self.results.poll(20000), f"{len(request_ids) - len(done)} requests never finished"
            for item in MessageCodec(OutputBatch).decode(self.results.recv_multipart()).items:
                if isinstance(item, RequestError):
                    done[item.request_id] = item
                    continue
                assert isinstance(item, RequestDelta)
                tokens[item.request_id] += item.completions[0].token_ids
                if item.finished:
                    done[item.request_id] = tokens[item.request_id]
        return done

    def close(self) -> None:
        self.pausable.paused.clear()
        for w in (self.worker, *self.encoders):
            w.stop()
        for thread in self.threads:
            thread.join(5)
        for socket in (self.results, self.to_worker, *self.to_encoders):
            socket.close(linger=0)
        self.context.term()


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def wait_until_stable(read: Callable[[], object], stable_s: float = 0.5, timeout_s: float = 20.0) -> object:
    """The value of `read()` once it has not changed for `stable_s`."""
    deadline = time.monotonic() + timeout_s
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_value = read()
        if now_value != value:
            value, since = now_value, time.monotonic()
        elif time.monotonic() - since >= stable_s:
            return value
    raise AssertionError(f"never settled: {value}")


def test_a_prefill_worker_that_starts_nothing_holds_the_encoders_back_and_nothing_is_lost(vlm_dirs):
    datas = [png(56, 56, seed=60), png(84, 56, seed=61)]
    with tempfile.TemporaryDirectory(prefix="tristage-") as sockets:
        prompt_ids, _ = gateway_refs(MultiModalProcessor.from_model_dir(vlm_dirs[LLAVA]), datas)
        bound = 2 * len(prompt_ids)  # two requests' prompts
        cluster = PrefillWithEncoders(vlm_dirs[LLAVA], sockets, max_ready_image_tokens=bound)
        worker, images, encoders = cluster.worker, cluster.worker.images, cluster.encoders
        try:
            cluster.send_requests(["reference"], datas)  # the engine steps: the tokens every request must get
            expected = cluster.outcomes(["reference"])["reference"]
            assert isinstance(expected, list) and len(expected) == MAX_TOKENS

            cluster.pausable.paused.set()
            request_ids = [f"r{i}" for i in range(NUM_REQUESTS)]
            cluster.send_requests(request_ids, datas)
            received = wait_until_stable(lambda: [e.num_requests_received for e in encoders])
            # the prefill worker took embeddings until two requests were complete, waiting for a step
            assert (len(images.ready), images.ready.num_tokens, images.holding_back) == (2, bound, True)
            assert worker.engine.scheduler_stats().num_waiting_requests == 2
            # each encoder: its sends to the worker full, its queue full of the worker's images, none in the
            # pipeline, and the rest of its requests left in ZeroMQ
            for encoder, num_received in zip(encoders, received):
                stats = encoder.stats()
                assert num_received < NUM_REQUESTS and not stats.taking_work
                assert (stats.num_images_queued, stats.num_images_in_flight) == (encoder.max_queued_images, 0)
                assert stats.outbox_bytes > 0

            # an abort of a waiting request frees its share: two more requests become complete, no more
            ready_before = set(images.ready.request_ids())
            for request_id in ready_before:
                cluster.abort(request_id)
            time.sleep(SETTLE_S)
            wait_until_stable(lambda: (len(images.ready), images.num_pending))
            assert len(images.ready) == 2 and not ready_before & set(images.ready.request_ids())

            cluster.pausable.paused.clear()  # the engine steps again: everything else completes
            kept = [r for r in request_ids if r not in ready_before]
            outcomes = cluster.outcomes(kept)
            assert all(outcomes[r] == expected for r in kept), {r: o for r, o in outcomes.items() if o != expected}

            time.sleep(SETTLE_S)  # the loops' next turns
            for encoder in encoders:
                stats = encoder.stats()
                assert stats.num_requests_received == NUM_REQUESTS + 1 and stats.taking_work
                assert (stats.num_images_queued, stats.num_images_in_flight, stats.outbox_bytes) == (0, 0, 0)
            assert (len(images.ready), images.ready.num_tokens, images.num_pending) == (0, 0, 0)
            assert not images.holding_back
            assert len(worker.requests) == 0 and not worker.engine.has_unfinished_requests()
            assert worker.engine.num_free_blocks() == worker.engine.num_usable_blocks()
        finally:
            cluster.close()


@pytest.fixture
def held_link(vlm_dirs):
    """An encode worker whose first destination never reads (ipc: little kernel buffering), and a second one."""
    with tempfile.TemporaryDirectory(prefix="tristage-") as sockets:
        encoder = ImageEncoder(vlm_dirs[LLAVA], "cpu", torch.float32)
        link = Link(encoder, receive_hwm=1, deliver_to=f"ipc://{sockets}/held", max_batch_images=4, give_up_after_s=2.0)
        other = configure(link.ctx.socket(zmq.PULL), MAX_EMBEDDING_MESSAGE_BYTES)
        other_address = bind(other, f"ipc://{sockets}/other")
        link.worker.peers.register(
            DataPlanePeers(reply_address="gateway", embedding_addresses=[link.deliver_to, other_address])
        )
        yield link.start(), other, other_address
        other.close(linger=0)
        link.close()


def test_a_held_destination_leaves_the_others_flowing_and_is_given_up_once_it_takes_nothing(held_link):
    link, other, other_address = held_link
    data = png(56, 84, seed=62)
    ref = image_ref(link.encoder.processor, data)
    codec = MessageCodec(EncoderInbound)

    def send(request_id: str, deliver_to: str) -> None:
        link.requests.send_multipart(
            codec.encode(EncodeRequest(request_id=request_id, image=ref, deliver_to=deliver_to), data)
        )

    def held() -> bool:
        """Embeddings wait in the outbox, still after a while (not only between a put and its send)."""
        if link.worker.stats().outbox_bytes == 0:
            return False
        time.sleep(0.2)
        return link.worker.stats().outbox_bytes > 0

    num_held = 0
    while not held():  # one at a time, until the first destination is full
        send(f"held-{num_held}", link.deliver_to)
        num_held += 1
        assert num_held < 500
        time.sleep(0.01)
    for i in range(2):  # queued behind the held destination, never started
        send(f"held-queued-{i}", link.deliver_to)
    for i in range(20):
        send(f"other-{i}", other_address)
    for i in range(20):  # the other destination's images pass the held ones
        assert other.poll(10000)
        header = MessageCodec(EmbeddingInbound).decode(other.recv_multipart())
        assert header.request_id == f"other-{i}"
    stats = link.worker.stats()
    assert stats.num_images_queued == 2 and stats.outbox_bytes > 0 and stats.taking_work
    # nothing taken for give_up_after_s: its embeddings in the outbox and its queued images are dropped
    wait_for(lambda: link.worker.stats().num_requests_given_up > 0)
    stats = link.worker.stats()
    assert (stats.num_images_queued, stats.num_images_in_flight, stats.outbox_bytes) == (0, 0, 0)
    assert stats.num_requests_given_up >= 2 and stats.taking_work
    send("after", other_address)  # the worker goes on serving
    assert other.poll(10000)
