"""The encode path made cheaper, and still exact where it must be, with tiny random VLMs (fixture `vlm_dirs`):

* draft decoding: the reduction each processor allows (LLaVA-1.5's CLIP at 336 px, SigLIP, Qwen2-VL's
  smart_resize, whose patch grid must not change), and embeddings equal to the tower's on the same
  drafted pixels (or on the full decode, with drafting off);
* the pipeline: ImageEncoder.start / finish overlapped, and an EncodeWorker of depth 2, give the serial
  path's embeddings bit for bit; an abort while a batch is being preprocessed frees everything;
* a JPEG whose header is fine but whose data is truncated: past the gateway's header check, the encode
  worker's decode refuses it and the request comes back as a 400 naming the image, with nothing left
  behind (queues, pipeline, inbox, cache, KV blocks).
"""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch
import transformers
import zmq

from services.common.channels import bind, configure, connect
from services.common.codec import MessageCodec
from services.common.images import ImageLimits, check_image, decode_image, draft_size, encoded_content_hash
from services.common.messages import (
    DataPlanePeers,
    EncodeRequest,
    EncoderInbound,
    GenerateRequest,
    ImageRef,
    OutputBatch,
    RequestError,
    SamplingSpec,
    WorkerInbound,
)
from services.engine import LLMEngine
from services.engine.models.loader import read_model_config
from services.engine.multimodal import MultiModalProcessor, VisionEncoder
from services.workers.encode_worker import EncodeWorker
from services.workers.encoder import ImageEncoder
from services.workers.engine_worker import EngineWorker
from tests.unit.test_encode_worker import Link, png
from tests.vlm_models import random_image

LLAVA, SIGLIP, QWEN = "llava-clip-llama", "llava-siglip-qwen2", "qwen2-vl"
SETTLE_S = 0.3  # for messages sent to a socket to reach it (loopback: well under 1 ms)


def jpeg(width: int, height: int, seed: int) -> bytes:
    out = io.BytesIO()
    random_image(width, height, seed).save(out, format="JPEG", quality=90)
    return out.getvalue()


def gateway_refs(processor: MultiModalProcessor, datas: list[bytes]) -> tuple[list[int], list[ImageRef]]:
    """What a gateway sends for a prompt with these images: their header-checked sizes laid out."""
    checked = [check_image(data, ImageLimits()) for data in datas]
    prompt = processor.tokenizer.encode(processor.image_placeholder * len(datas) + "What is this?")
    token_ids, layout = processor.layout(prompt, [(c.width, c.height) for c in checked])
    refs = [
        ImageRef(content_hash=c.content_hash, offset=offset, length=length, grid_thw=grid)
        for c, (offset, length, grid) in zip(checked, layout)
    ]
    return token_ids, refs


# ----------------------------------------------------------------------------------------------
# Draft decoding


def test_the_draft_is_the_largest_reduction_that_keeps_what_the_processor_resizes_to(vlm_dirs):
    tiny = MultiModalProcessor.from_model_dir(vlm_dirs[LLAVA])
    # LLaVA-1.5's image processor: the shortest edge to 336 px, then a 336 px crop
    clip_336 = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    llava = MultiModalProcessor(tiny.spec, read_model_config(vlm_dirs[LLAVA]), tiny.tokenizer, clip_336)
    assert llava.resize_target(4000, 3000) == (448, 336)
    assert llava.draft_scale(4000, 3000) == 8 and draft_size(4000, 3000, 8) == (500, 375)
    assert llava.draft_scale(3000, 4000) == 8  # portrait: 375x500 for 336x448
    assert llava.draft_scale(2048, 2048) == 4  # 512x512; at 1/8, 256 < 336
    assert llava.draft_scale(1024, 768) == 2  # 512x384 for 448x336
    assert llava.draft_scale(640, 480) == 1  # 320x240 at 1/2 would be smaller than 448x336
    assert llava.draft_scale(200, 100) == 1  # upscaled by the processor
    siglip = MultiModalProcessor.from_model_dir(vlm_dirs[SIGLIP])  # a fixed 42x42
    assert (siglip.resize_target(4000, 3000), siglip.draft_scale(4000, 3000), siglip.draft_scale(80, 300)) == (
        (42, 42),
        8,
        1,
    )
    qwen = MultiModalProcessor.from_model_dir(vlm_dirs[QWEN])  # smart_resize into [28 x 28, 112 x 112] pixels
    assert qwen.resize_target(4000, 3000) == (112, 84) and qwen.draft_scale(4000, 3000) == 8
    # at 1/2, 50x226 is as large as the 28x224 target, but smart_resize would make it 56x224: another grid
    assert qwen.resize_target(100, 451) == (28, 224) and qwen.resize_target(*draft_size(100, 451, 2)) == (56, 224)
    assert qwen.draft_scale(100, 451) == 1
    assert qwen.draft_scale(109, 1738) == 2  # 1/4 is large enough, but only 1/2 keeps the 28x420 grid


@pytest.mark.parametrize("family", [LLAVA, QWEN])
def test_a_drafted_jpeg_encodes_as_the_tower_does_on_the_same_pixels(vlm_dirs, family):
    data = jpeg(1000, 750, seed=1)
    processor = MultiModalProcessor.from_model_dir(vlm_dirs[family])
    assert processor.draft_scale(1000, 750) == 8  # 125x94: CLIP's 74x56, Qwen2-VL's 112x84 (grid kept)
    _, [ref] = gateway_refs(processor, [data])
    vision = VisionEncoder.from_model_dir(vlm_dirs[family], "cpu", torch.float32)
    for draft, scale in ((True, processor.draft_scale(1000, 750)), (False, 1)):
        encoder = ImageEncoder(vlm_dirs[family], "cpu", torch.float32, image_draft_decode=draft, preprocess_threads=1)
        [rows] = encoder.encode([(ref, data)])
        decoded = decode_image(data, ImageLimits(), draft_scale=lambda w, h, s=scale: s)
        expected = vision.encode(processor.process(processor.image_placeholder, [decoded.image]).images)[0]
        assert isinstance(rows, torch.Tensor) and torch.equal(rows, expected), (family, draft)
        assert (decoded.image.size, encoder.stats.num_images_drafted) == (draft_size(1000, 750, scale), int(draft))


# ----------------------------------------------------------------------------------------------
# The pipeline


@pytest.mark.parametrize("family", [LLAVA, QWEN])
def test_overlapped_batches_give_the_serial_embeddings_bit_for_bit(vlm_dirs, family):
    processor = MultiModalProcessor.from_model_dir(vlm_dirs[family])
    datas = [jpeg(1000, 750, seed=2), png(84, 56, seed=3), jpeg(300, 200, seed=4), png(56, 84, seed=5)]
    truncated = datas[0][: len(datas[0]) // 2]
    _, refs = gateway_refs(processor, [*datas, truncated])
    items = list(zip(refs, [*datas, truncated]))
    wrong = (refs[4], datas[3])  # bytes that do not hash to the ref's content hash (which is not cached)
    # the first image again in the second batch (being prepared for the batch ahead), and bad items
    batches = [[items[0], items[1], items[4]], [items[2], items[0], wrong, items[3]], [items[1], items[2]]]
    serial = ImageEncoder(vlm_dirs[family], "cpu", torch.float32)
    pipelined = ImageEncoder(vlm_dirs[family], "cpu", torch.float32)
    expected = [serial.encode(batch) for batch in batches]
    started = [pipelined.start(batch) for batch in batches[:2]]
    got = [pipelined.finish(started[0]), pipelined.finish(started[1]), pipelined.encode(batches[2])]
    for want_batch, got_batch in zip(expected, got):
        for want, have in zip(want_batch, got_batch, strict=True):
            assert (want == have) if isinstance(want, str) else torch.equal(want, have)
    assert "it is truncated or corrupt" in got[0][2] and "hash to" in got[1][2]
    for encoder in (serial, pipelined):
        stats, cache = encoder.stats, encoder.cache
        assert (stats.num_tower_calls, stats.num_images_encoded, stats.num_errors) == (2, 4, 2)
        assert (cache.num_queries, cache.num_hits) == (9, 3)


def test_a_worker_with_a_pipeline_sends_what_a_serial_worker_sends(vlm_dirs):
    datas = [jpeg(400 + 50 * i, 300, seed=10 + i) for i in range(6)]
    received = {}
    for depth in (1, 2):
        encoder = ImageEncoder(vlm_dirs[QWEN], "cpu", torch.float32)
        _, refs = gateway_refs(encoder.processor, datas)
        # one image a batch: the same batches whatever the timing (batches of several: the test above)
        link = Link(encoder, max_batch_images=1, pipeline_depth=depth).start()
        try:
            for i, (ref, data) in enumerate(zip(refs, datas)):
                link.send(f"r{i}", ref, data)
            received[depth] = [link.receive() for _ in datas]
            stats = link.worker.stats()
            assert (stats.num_tower_calls, stats.num_images_in_flight, stats.num_images_queued) == (6, 0, 0)
        finally:
            link.close()
    for (h1, rows1), (h2, rows2) in zip(received[1], received[2], strict=True):
        assert h1.request_id == h2.request_id and h1.error is None and torch.equal(rows1, rows2)


def test_an_abort_while_the_batch_is_preprocessed_frees_everything(vlm_dirs):
    encoder = ImageEncoder(vlm_dirs[LLAVA], "cpu", torch.float32)
    datas = [png(56, 56, seed=20), jpeg(600, 400, seed=21), jpeg(400, 600, seed=22)]
    _, refs = gateway_refs(encoder.processor, datas)
    # the worker's socket queues max_batch_images requests (its RCVHWM, set when it binds): 8, so the first
    # turn takes all three; then batches of one, so two of them are in the pipeline while the tower runs
    link = Link(encoder, max_batch_images=8, max_queued_images=3)
    link.worker.max_batch_images = 1
    tower, in_tower, go_on = encoder.vision.encode, threading.Event(), threading.Event()

    def held_tower(items):  # the first tower call waits for the test: batches 2 and 3 are in the pipeline
        encoder.vision.encode = tower
        in_tower.set()
        assert go_on.wait(10)
        return tower(items)

    encoder.vision.encode = held_tower
    try:
        for name, ref, data in zip(("kept", "aborted", "aborted"), refs, datas):
            link.send(name, ref, data)
        time.sleep(SETTLE_S)
        link.start()
        assert in_tower.wait(10)
        assert link.worker.stats().num_images_in_flight == 2  # the first batch, and the second one started
        link.abort("aborted")
        time.sleep(SETTLE_S)
        go_on.set()
        header, _ = link.receive()
        assert header.request_id == "kept" and not link.embeddings.poll(300)
        stats = link.worker.stats()
        assert (stats.num_images_queued, stats.num_images_in_flight, stats.outbox_bytes) == (0, 0, 0)
        assert (stats.num_requests_aborted, stats.num_images_encoded, stats.num_tower_calls) == (2, 1, 1)
        assert encoder.cache.hashes() == [refs[0].content_hash] and encoder._unfinished == []
    finally:
        go_on.set()
        link.close()


# ----------------------------------------------------------------------------------------------
# A corrupt image, end to end: gateway check -> encode worker -> the worker that parked the request


class Cluster:
    """An encode worker delivering to a colocated engine worker (no encoder of its own), and the
    gateway's sockets: requests to both, results from the engine worker."""

    def __init__(self, model_dir: str) -> None:
        self.engine = LLMEngine(model=model_dir, block_size=8, num_kv_blocks=64)
        self.worker = EngineWorker(self.engine, "tcp://127.0.0.1:0", "colocated-0")
        self.encoder = ImageEncoder(model_dir, "cpu", torch.float32)
        self.encode_worker = EncodeWorker(self.encoder, "tcp://127.0.0.1:0", "encoder-0")
        self.context = zmq.Context()
        self.results = configure(self.context.socket(zmq.PULL))
        self.reply_to = bind(self.results, "tcp://127.0.0.1:0")
        self.worker.peers.register(DataPlanePeers(reply_address=self.reply_to))
        self.encode_worker.peers.register(
            DataPlanePeers(reply_address=self.reply_to, embedding_addresses=[self.worker.embedding_address])
        )
        self.to_worker = connect(configure(self.context.socket(zmq.PUSH)), self.worker.input_address)
        self.to_encoder = connect(configure(self.context.socket(zmq.PUSH)), self.encode_worker.input_address)
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in (self.worker, self.encode_worker)]
        for thread in self.threads:
            thread.start()

    def send(self, request_id: str, datas: list[bytes], *, images_first: bool = False) -> None:
        token_ids, refs = gateway_refs(self.encoder.processor, datas)
        message = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling=SamplingSpec(temperature=0, max_tokens=2, ignore_eos=True),
            reply_to=self.reply_to,
            images=refs,
        )
        if not images_first:
            self.to_worker.send_multipart(MessageCodec(WorkerInbound).encode(message))
        for ref, data in zip(refs, datas):
            request = EncodeRequest(request_id=request_id, image=ref, deliver_to=self.worker.embedding_address)
            self.to_encoder.send_multipart(MessageCodec(EncoderInbound).encode(request, data))
        if images_first:  # the encoder's answers reach the worker before the request does
            deadline = time.monotonic() + 10
            while self.encode_worker.stats().embedding_bytes_sent == 0 or self.encode_worker.stats().outbox_bytes:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(SETTLE_S)
            self.to_worker.send_multipart(MessageCodec(WorkerInbound).encode(message))

    def outcome(self, request_id: str) -> RequestError | list[int]:
        """The request's error, or its tokens once finished."""
        tokens: list[int] = []
        while True:
            assert self.results.poll(10000), "no answer from the worker"
            for item in MessageCodec(OutputBatch).decode(self.results.recv_multipart()).items:
                assert item.request_id == request_id
                if isinstance(item, RequestError):
                    return item
                tokens += item.completions[0].token_ids
                if item.finished:
                    return tokens

    def close(self) -> None:
        for w in (self.worker, self.encode_worker):
            w.stop()
        for thread in self.threads:
            thread.join(5)
        for socket in (self.results, self.to_worker, self.to_encoder):
            socket.close(linger=0)
        self.context.term()


@pytest.mark.parametrize("images_first", [False, True], ids=["request-first", "images-first"])
def test_a_truncated_jpeg_past_the_header_check_is_a_400_naming_it_and_frees_everything(vlm_dirs, images_first):
    cluster = Cluster(vlm_dirs[QWEN])
    try:
        good, photo, other = png(84, 56, seed=30), jpeg(400, 300, seed=31), png(56, 84, seed=32)
        truncated = photo[: len(photo) // 2]
        assert check_image(truncated, ImageLimits()).width == 400  # the gateway lets it through
        # the encoder answers in order: image 1's embedding comes before the failure, image 3's after it
        cluster.send("bad", [good, truncated, other], images_first=images_first)
        error = cluster.outcome("bad")
        assert isinstance(error, RequestError) and (error.status, error.type, error.param) == (
            400,
            "invalid_request_error",
            "messages",
        )
        assert error.message == "image 2 could not be encoded: it is truncated or corrupt and could not be decoded"
        cluster.send("fine", [good])  # the same good image again: the worker goes on serving
        assert len(cluster.outcome("fine")) == 2
        time.sleep(SETTLE_S)  # a turn for anything still on its way
        stats = cluster.encode_worker.stats()
        assert (stats.num_images_queued, stats.num_images_in_flight, stats.outbox_bytes) == (0, 0, 0)
        assert (stats.num_encode_errors, stats.embedding_cache_hits) == (1, 1)
        # an error is never cached
        assert set(cluster.encoder.cache.hashes()) == {encoded_content_hash(good), encoded_content_hash(other)}
        assert len(cluster.worker.requests) == 0 and cluster.worker.images.num_pending == 0
        assert cluster.engine.num_free_blocks() == cluster.engine.num_usable_blocks()
    finally:
        cluster.close()
