"""The encode stage: the embedding cache, ImageEncoder, and the EncodeWorker loop over real ZeroMQ sockets on
loopback (no Ray), with tiny random VLMs (tests/vlm_models.py, fixture `vlm_dirs`).

What a worker delivers equals the vision encoder's output for the processor's pixels; a repeated image is a
cache hit; a turn's images share one tower call; bad images get error embeddings while the worker keeps
serving; a receiver that stops reading stops the worker from taking work; aborts drop queued work.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time

import pytest
import torch
import zmq

from services.common.channels import bind, configure
from services.common.codec import DecodeError, MessageCodec
from services.common.images import ImageLimits, decode_image_bytes, encoded_content_hash
from services.common.messages import (
    AbortRequest,
    DataPlanePeers,
    EmbeddingInbound,
    EncodeRequest,
    EncoderInbound,
    ImageEmbedding,
    ImageRef,
)
from services.engine.multimodal import MultiModalProcessor, VisionEncoder
from services.workers.encode_worker import EncodeWorker, Outbox
from services.workers.encoder import EmbeddingCache, ImageEncoder
from services.workers.wire import MAX_EMBEDDING_MESSAGE_BYTES, embedding_frame, embedding_from_frame
from tests.vlm_models import random_image

LLAVA, QWEN = "llava-clip-llama", "qwen2-vl"
SETTLE_S = 0.3  # for messages sent before a worker starts to reach its socket (loopback: well under 1 ms)


def png(width: int, height: int, seed: int) -> bytes:
    out = io.BytesIO()
    random_image(width, height, seed).save(out, format="PNG")
    return out.getvalue()


def image_ref(processor: MultiModalProcessor, data: bytes, offset: int = 0) -> ImageRef:
    """The ImageRef a gateway would send for these encoded bytes."""
    image = decode_image_bytes(data, ImageLimits()).image
    item = processor.process(processor.image_placeholder, [image]).images[0]
    return ImageRef(
        content_hash=encoded_content_hash(data), offset=offset, length=item.length, grid_thw=item.image_grid_thw
    )


def reference_rows(model_dir: str, datas: list[bytes], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """VisionEncoder.encode of MultiModalProcessor.process's items: the images of one prompt, in one call."""
    processor = MultiModalProcessor.from_model_dir(model_dir)
    images = [decode_image_bytes(d, ImageLimits()).image for d in datas]
    processed = processor.process(processor.image_placeholder * len(images), images)
    return VisionEncoder.from_model_dir(model_dir, "cpu", dtype).encode(processed.images)


class Link:
    """An EncodeWorker on its own thread, a gateway's request socket and a prefill worker's embedding socket."""

    def __init__(
        self,
        encoder: ImageEncoder,
        receive_hwm: int | None = None,
        deliver_to: str = "tcp://127.0.0.1:0",
        **worker_kwargs,
    ) -> None:
        self.encoder = encoder
        self.worker = EncodeWorker(encoder, "tcp://127.0.0.1:0", "encoder-0", **worker_kwargs)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.ctx = zmq.Context()
        self.embeddings = configure(self.ctx.socket(zmq.PULL), MAX_EMBEDDING_MESSAGE_BYTES)
        if receive_hwm is not None:
            self.embeddings.setsockopt(zmq.RCVHWM, receive_hwm)
        self.deliver_to = bind(self.embeddings, deliver_to)
        # as the gateway registers it over Ray: the one embedding socket the worker may deliver to
        self.worker.peers.register(DataPlanePeers(reply_address="gateway", embedding_addresses=[self.deliver_to]))
        self.requests = configure(self.ctx.socket(zmq.PUSH))
        self.requests.connect(self.worker.input_address)
        self._codec = MessageCodec(EncoderInbound)
        self._embedding_codec = MessageCodec(EmbeddingInbound)

    def start(self) -> Link:
        self.thread.start()
        return self

    def send(self, request_id: str, ref: ImageRef, data: bytes) -> None:
        message = EncodeRequest(request_id=request_id, image=ref, deliver_to=self.deliver_to)
        self.requests.send_multipart(self._codec.encode(message, data))

    def abort(self, request_id: str) -> None:
        self.requests.send_multipart(self._codec.encode(AbortRequest(request_id=request_id)))

    def receive(self, timeout_ms: int = 10000) -> tuple[ImageEmbedding, torch.Tensor | None]:
        assert self.embeddings.poll(timeout_ms), "no embedding from the encode worker"
        frames = self.embeddings.recv_multipart()
        header = self._embedding_codec.decode(frames)
        if header.error is not None:
            assert len(frames) == 1
            return header, None
        assert len(frames) == 2
        return header, embedding_from_frame(header, frames[1])

    def close(self) -> None:
        self.worker.stop()
        if self.thread.is_alive():
            self.thread.join(5)
        self.embeddings.close()
        self.requests.close()
        self.ctx.term()


@pytest.fixture
def link_to(vlm_dirs):
    links = []

    def make(family: str, dtype: torch.dtype = torch.float32, *, cache_capacity_bytes: int = 2**20, **kwargs) -> Link:
        encoder = ImageEncoder(vlm_dirs[family], "cpu", dtype, cache_capacity_bytes=cache_capacity_bytes)
        links.append(Link(encoder, **kwargs))
        return links[-1]

    yield make
    for link in links:
        link.close()


# ----------------------------------------------------------------------------------------------
# The cache


def test_cache_evicts_least_recently_used_entries_until_the_new_one_fits():
    def block(num_rows):  # num_rows x 16 bytes
        return torch.zeros(num_rows, 4)

    cache = EmbeddingCache(capacity_bytes=200)
    assert cache.put("a", block(4)) == [] and cache.put("b", block(4)) == [] and cache.put("c", block(4)) == []
    assert cache.num_bytes_used == 192
    assert cache.get("a") is not None  # a is now the most recently used
    assert cache.put("d", block(4)) == ["b"]
    assert cache.hashes() == ["c", "a", "d"]
    assert cache.get("b") is None
    assert cache.put("e", block(8)) == ["c", "a"]  # 128 bytes: two entries make room
    assert cache.hashes() == ["d", "e"] and cache.num_bytes_used == 192
    assert cache.put("huge", block(13)) == []  # 208 bytes > the whole budget: not cached, nothing evicted
    assert cache.hashes() == ["d", "e"] and "huge" not in cache
    assert cache.put("d", block(2)) == []  # replacing an entry frees its old bytes
    assert cache.hashes() == ["e", "d"] and cache.num_bytes_used == 160
    assert (cache.num_queries, cache.num_hits, cache.num_evictions) == (2, 1, 3)


def test_outbox_keeps_order_per_destination_and_an_abort_drops_what_waits():
    ctx = zmq.Context()
    receiver = configure(ctx.socket(zmq.PULL))
    address = bind(receiver, "tcp://127.0.0.1:0")
    outbox = Outbox(ctx)
    for request_id, payload in (("a", b"1"), ("b", b"22"), ("a", b"333"), ("b", b"4444")):
        outbox.put(address, request_id, [request_id.encode(), payload])
    assert (outbox.num_messages, outbox.num_bytes) == (4, 14)
    assert outbox.drop("a") == 2 and (outbox.num_messages, outbox.num_bytes) == (2, 8)
    outbox.flush()
    received = [receiver.recv_multipart() for _ in range(2)]
    assert received == [[b"b", b"22"], [b"b", b"4444"]]
    assert (outbox.num_messages, outbox.num_bytes, outbox.num_bytes_sent) == (0, 0, 8)
    outbox.close()
    receiver.close()
    ctx.term()


def test_embedding_frames_round_trip_and_a_frame_of_the_wrong_size_is_refused():
    rows = torch.randn(3, 5).to(torch.bfloat16)
    dtype, payload = embedding_frame(rows)
    header = ImageEmbedding(request_id="r", content_hash="h", num_rows=3, hidden_size=5, dtype=dtype)
    assert dtype == "bfloat16" and torch.equal(embedding_from_frame(header, bytes(payload)), rows)
    with pytest.raises(DecodeError, match="holds 28 bytes; 3 x 5 bfloat16 rows take 30 bytes"):
        embedding_from_frame(header, bytes(payload)[:-2])
    with pytest.raises(DecodeError, match="dtype"):
        embedding_from_frame(
            ImageEmbedding(request_id="r", content_hash="h", num_rows=3, hidden_size=5, dtype="int64"), bytes(payload)
        )


# ----------------------------------------------------------------------------------------------
# The worker


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", [LLAVA, QWEN])
def test_the_delivered_embedding_equals_the_vision_encoders(link_to, vlm_dirs, family, dtype):
    link = link_to(family, dtype).start()
    data = png(56, 84, seed=1)
    ref = image_ref(link.encoder.processor, data, offset=3)
    link.send("r", ref, data)
    header, rows = link.receive()
    (expected,) = reference_rows(vlm_dirs[family], [data], dtype)
    assert header.error is None and (header.request_id, header.content_hash) == ("r", ref.content_hash)
    assert (header.num_rows, header.hidden_size, header.dtype) == (ref.length, 64, str(dtype)[len("torch.") :])
    assert rows.dtype == dtype and torch.equal(rows, expected)
    stats = link.worker.stats()
    assert stats.embedding_bytes_sent > rows.numel() * rows.element_size()
    assert stats.encode_seconds.buckets[-1] == (float("inf"), 1)


def test_a_second_request_for_the_same_image_is_a_cache_hit(link_to):
    link = link_to(QWEN).start()
    data = png(112, 112, seed=2)
    ref = image_ref(link.encoder.processor, data)
    link.send("first", ref, data)
    _, first = link.receive()
    link.send("second", ref, data)
    header, second = link.receive()
    assert header.request_id == "second" and torch.equal(first, second)
    stats = link.worker.stats()
    assert (stats.num_tower_calls, stats.num_images_encoded) == (1, 1)
    assert (stats.embedding_cache_queries, stats.embedding_cache_hits) == (2, 1)


@pytest.mark.parametrize("family", [LLAVA, QWEN])
def test_the_images_of_one_turn_share_one_tower_call(link_to, vlm_dirs, family):
    link = link_to(family)
    datas = [png(56, 84, seed=10), png(112, 112, seed=11), png(112, 28, seed=12)]
    refs = [image_ref(link.encoder.processor, d) for d in datas]
    for ref, data in zip(refs, datas):  # one request of three images...
        link.send("three", ref, data)
    link.send("again", refs[1], datas[1])  # ...and another request with one of them
    time.sleep(SETTLE_S)  # all four wait in the worker's socket before its first turn
    link.start()
    received = [link.receive() for _ in range(4)]
    expected = reference_rows(vlm_dirs[family], datas)
    assert [(h.request_id, h.content_hash) for h, _ in received] == [
        ("three", refs[0].content_hash),
        ("three", refs[1].content_hash),
        ("three", refs[2].content_hash),
        ("again", refs[1].content_hash),
    ]
    for (header, rows), want in zip(received, [*expected, expected[1]]):
        assert header.num_rows == want.shape[0] and torch.equal(rows, want)
    stats = link.worker.stats()
    assert (stats.num_tower_calls, stats.num_images_encoded) == (1, 3)


def test_bad_images_get_error_embeddings_and_the_worker_keeps_serving(link_to):
    link = link_to(QWEN)
    processor, codec = link.encoder.processor, MessageCodec(EncoderInbound)
    good, other = png(56, 84, seed=20), png(84, 56, seed=21)
    ref, other_ref = image_ref(processor, good), image_ref(processor, other)
    assert ref.length == other_ref.length and ref.grid_thw != other_ref.grid_thw  # 4x6 and 6x4 patches
    link.requests.send_multipart([b"\x93not a message"])  # dropped
    link.send(
        "corrupt",
        ImageRef(content_hash=encoded_content_hash(b"not an image"), offset=0, length=6, grid_thw=(1, 6, 4)),
        b"not an image",
    )
    truncated = good[: len(good) // 2]
    link.send(
        "truncated",
        ImageRef(content_hash=encoded_content_hash(truncated), offset=0, length=6, grid_thw=(1, 6, 4)),
        truncated,
    )
    link.send("wrong-hash", ImageRef(content_hash=other_ref.content_hash, offset=0, length=6, grid_thw=(1, 6, 4)), good)
    link.send("long", ImageRef(content_hash=ref.content_hash, offset=0, length=7, grid_thw=ref.grid_thw), good)
    link.send("grid", ImageRef(content_hash=ref.content_hash, offset=0, length=6, grid_thw=other_ref.grid_thw), good)
    link.requests.send_multipart(
        codec.encode(EncodeRequest(request_id="no-bytes", image=ref, deliver_to=link.deliver_to))
    )
    link.send("good", ref, good)  # in the same batch as the bad ones
    time.sleep(SETTLE_S)
    link.start()
    received = {header.request_id: (header, rows) for header, rows in (link.receive() for _ in range(7))}
    errors = {rid: header.error for rid, (header, _) in received.items() if rid != "good"}
    assert "not a PNG, JPEG" in errors["corrupt"]
    assert "truncated or corrupt" in errors["truncated"]
    assert f"hash to {ref.content_hash}" in errors["wrong-hash"]
    assert "yields 6 embedding rows but its placeholder run is 7 tokens" in errors["long"]
    assert "patch grid is 1x6x4, but the request gives 1x4x6" in errors["grid"]
    assert "needs exactly one" in errors["no-bytes"]
    assert all(received[rid][0].num_rows == 0 and received[rid][1] is None for rid in errors)
    header, rows = received["good"]
    assert header.error is None and rows.shape == (6, 64)
    link.send("later", other_ref, other)  # a later turn
    header, rows = link.receive()
    assert (header.request_id, header.error, rows.shape) == ("later", None, (6, 64))
    stats = link.worker.stats()
    assert stats.num_encode_errors == 5  # "no-bytes" never reached the encoder
    assert (stats.num_tower_calls, stats.num_images_encoded) == (2, 2)  # "good", "long", "grid": one image


@pytest.mark.parametrize("outbox_budget", [True, False], ids=["outbox-over-budget", "queue-full-of-held-images"])
def test_a_receiver_that_stops_reading_stops_the_worker_taking_work(link_to, outbox_budget):
    # A prefill worker with no room: one message in its ZeroMQ queue. Its socket is ipc, not tcp, only
    # to keep the kernel's share of the buffering small (TCP autotunes it to megabytes): about 100 KiB.
    # The worker stops receiving once its outbox is over budget, or (a large budget) once its queue is
    # full of images for the held destination, none of which it starts.
    budget = {"max_outbox_bytes": 4 * 1024} if outbox_budget else {}  # under one embedding
    with tempfile.TemporaryDirectory(prefix="tristage-") as sockets:
        link = link_to(
            LLAVA, receive_hwm=1, deliver_to=f"ipc://{sockets}/prefill", max_batch_images=8, **budget
        ).start()
        _check_back_pressure(link, num_requests=200, outbox_budget=outbox_budget)  # 16 x 64 float32: 4 KiB each


def _check_back_pressure(link: Link, num_requests: int, outbox_budget: bool) -> None:
    data = png(56, 84, seed=30)
    ref = image_ref(link.encoder.processor, data)
    for i in range(num_requests):
        link.send(str(i), ref, data)
    stalled = _wait_until_stable(lambda: link.worker.num_requests_received)
    assert stalled < num_requests and not link.worker.taking_work()
    stats = link.worker.stats()
    if outbox_budget:
        assert stats.outbox_bytes > 4 * 1024
    else:  # what the pipeline held when the destination filled up waits in the outbox; nothing more started
        assert stats.outbox_bytes > 0 and (stats.num_images_queued, stats.num_images_in_flight) == (16, 0)
    # the receiver reads: everything arrives, in order
    received = [link.receive() for _ in range(num_requests)]
    assert [h.request_id for h, _ in received] == [str(i) for i in range(num_requests)]
    assert all(torch.equal(rows, received[0][1]) for _, rows in received)
    assert link.worker.num_requests_received == num_requests
    time.sleep(SETTLE_S)  # the last message can reach us before the worker's loop has counted it sent
    stats = link.worker.stats()
    assert (stats.num_tower_calls, stats.outbox_bytes, stats.taking_work) == (1, 0, True)


def _wait_until_stable(read, stable_s: float = 0.5, timeout_s: float = 10.0) -> int:
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
    raise AssertionError("the worker never stopped taking work")


def test_an_abort_drops_the_requests_queued_work(link_to):
    link = link_to(LLAVA)
    datas = [png(56, 56, seed=40 + i) for i in range(3)]
    refs = [image_ref(link.encoder.processor, d) for d in datas]
    link.send("aborted", refs[0], datas[0])
    link.send("aborted", refs[1], datas[1])
    link.abort("aborted")
    link.send("kept", refs[2], datas[2])
    time.sleep(SETTLE_S)
    link.start()
    header, _ = link.receive()
    assert header.request_id == "kept"  # the aborted images would have been sent first
    assert not link.embeddings.poll(200)
    stats = link.worker.stats()
    assert (stats.num_requests_aborted, stats.num_images_encoded) == (2, 1)


def test_a_failure_while_encoding_fails_that_batch_only(link_to):
    link = link_to(LLAVA).start()
    datas = [png(56, 56, seed=50 + i) for i in range(3)]
    refs = [image_ref(link.encoder.processor, d) for d in datas]
    tower, finish = link.encoder.vision.encode, link.encoder.finish

    def failing_tower(items):
        link.encoder.vision.encode = tower  # once
        raise RuntimeError("out of memory")

    def failing_finish(batch):
        link.encoder.finish = finish
        raise RuntimeError("a bug")

    link.encoder.vision.encode = failing_tower
    link.send("tower", refs[0], datas[0])
    header, rows = link.receive()
    assert header.error == "the vision encoder failed: out of memory" and rows is None
    link.encoder.finish = failing_finish
    link.send("bug", refs[1], datas[1])
    header, rows = link.receive()
    assert header.error == "internal error in the encoder: a bug" and rows is None
    link.send("fine", refs[2], datas[2])
    header, rows = link.receive()
    assert (header.request_id, header.error, rows.shape) == ("fine", None, (16, 64))
    assert refs[0].content_hash not in link.encoder.cache  # a failure is never cached
