"""An encode worker's load, as its state socket pushes it: the images in its pipeline (preprocessing or in
the tower) and those queued behind them (a stand-in tower that runs one call each time the test lets it,
so the counts can be read while it runs), then its cache's contents."""

from __future__ import annotations

import threading
import time

import torch
import zmq

from services.common.channels import bind, configure
from services.common.codec import MessageCodec
from services.common.control import EMBEDDING_CACHE_TOPIC, STATE_TOPICS, STATS_TOPIC, StateCodec, WorkerStats
from services.common.messages import DataPlanePeers, EncodeRequest, EncoderInbound, ImageRef
from services.workers.encode_worker import EncodeWorker
from services.workers.encoder import EmbeddingCache, EncodeBatch, EncodeStats

NUM_IMAGES = 5


class SteppedTower:
    """An ImageEncoder's interface: each `finish` call waits for one `step()` of the test."""

    def __init__(self) -> None:
        self.stats = EncodeStats()
        self.cache = EmbeddingCache(2**20)
        self._steps = threading.Semaphore(0)
        self.batch_sizes: list[int] = []

    def step(self) -> None:
        self._steps.release()

    def start(self, items: list[tuple[ImageRef, bytes]]) -> EncodeBatch:
        return EncodeBatch(items, {})

    def finish(self, batch: EncodeBatch) -> list[torch.Tensor]:
        items = batch.items
        self.batch_sizes.append(len(items))
        assert self._steps.acquire(timeout=10)
        rows = [torch.zeros(ref.length, 4) for ref, _ in items]
        for (ref, _), r in zip(items, rows):
            self.cache.put(ref.content_hash, r)
        self.stats.num_images_encoded += len(items)
        return rows


def test_images_in_the_tower_and_queued_are_pushed_before_each_tower_call():
    tower = SteppedTower()
    holder: list[EncodeWorker] = []
    worker = EncodeWorker(
        tower,
        "tcp://127.0.0.1:0",
        "encode-0",
        max_batch_images=2,
        max_queued_images=4,
        worker_stats=lambda: WorkerStats(name="encode-0", stage="encode", alive=True, encode=holder[0].stats()),
    )
    holder.append(worker)
    ctx = zmq.Context()
    state = configure(ctx.socket(zmq.SUB))
    for topic in STATE_TOPICS:
        state.setsockopt(zmq.SUBSCRIBE, topic)
    state.connect(worker.state_address)
    embeddings = configure(ctx.socket(zmq.PULL))
    deliver_to = bind(embeddings, "tcp://127.0.0.1:0")
    worker.peers.register(DataPlanePeers(reply_address="gateway", embedding_addresses=[deliver_to]))
    requests = configure(ctx.socket(zmq.PUSH))
    requests.connect(worker.input_address)
    codec, state_codec = MessageCodec(EncoderInbound), StateCodec()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert state.poll(5000)  # a heartbeat: the subscription is through
        time.sleep(0.05)  # past the stats' pace, so the turn that takes the first images publishes
        for i in range(NUM_IMAGES):
            request = EncodeRequest(
                request_id=f"r{i}", image=ImageRef(content_hash=f"image-{i}", offset=0, length=2), deliver_to=deliver_to
            )
            requests.send_multipart(codec.encode(request, b"the image's bytes"))
        delivered, in_tower, cache_contents = 0, [], []
        while delivered < NUM_IMAGES or sorted(cache_contents) != [f"image-{i}" for i in range(NUM_IMAGES)]:
            if embeddings.poll(0):
                embeddings.recv_multipart()
                delivered += 1
                continue
            if not state.poll(300):  # the tower waits, and the stats' pace held its turn's stats back
                tower.step()
                continue
            message = state_codec.decode(state.recv_multipart())
            if message.topic == EMBEDDING_CACHE_TOPIC:
                cache_contents = message.body.content_hashes
            if message.topic != STATS_TOPIC:
                continue
            stats = message.body.encode
            # every image taken off the socket is queued, in the tower, or done
            assert stats.num_requests_received == (
                stats.num_images_queued + stats.num_images_in_flight + stats.num_images_encoded
            )
            assert (message.body.num_waiting, message.body.num_running) == (
                stats.num_images_queued,
                stats.num_images_in_flight,
            )
            if stats.num_images_in_flight:  # published just before the call the tower now waits in
                in_tower.append(stats.num_images_in_flight)
                tower.step()
        # the first call at least was seen running; at most two batches of two in the pipeline
        assert in_tower and max(in_tower) <= 2 * worker.pipeline_depth
        assert sum(tower.batch_sizes) == NUM_IMAGES and max(tower.batch_sizes) <= 2
        final = worker.stats()
        assert (final.num_images_queued, final.num_images_in_flight, final.num_requests_received) == (0, 0, 5)
    finally:
        for _ in range(NUM_IMAGES):
            tower.step()
        worker.stop()
        thread.join(5)
        for socket in (state, embeddings, requests):
            socket.close(linger=0)
        ctx.term()
