"""An encode worker's heartbeat: receive EncodeRequests over ZeroMQ, encode them in batches, send each
image's embedding to the prefill worker the request names.

    loop:  wait (a request, a batch in the pipeline, or room at a held-back destination)
           -> receive into the queue (unless it takes no work: see back-pressure below)
           -> start batches from the queue while the pipeline has room: each one's decoding and
              preprocessing begins on the encoder's thread pool (ImageEncoder.start); images for held
              destinations (below) wait
           -> publish state
           -> finish the oldest batch: wait for its preprocessing, run the tower (ImageEncoder.finish),
              queue each result in the outbox
           -> flush the outbox without blocking, then note which destinations are held

The pipeline overlaps the CPU and the tower: while the tower runs on batch N (on the loop's thread),
the pool decodes and preprocesses batch N+1, started in the same turn. It holds at most
`pipeline_depth` batches (started, not finished); depth 1 is the serial loop. The embeddings are those
of the serial loop for the same batches (ImageEncoder.finish does every lookup, tower call and cache put,
in the order the batches were started).

Wire form (services.common.messages): in, EncodeRequest + one frame (the image's encoded bytes), or
AbortRequest; out, per request, ImageEmbedding + one frame ([num_rows, hidden_size] rows, row-major, in
`dtype`, e.g. "bfloat16"), or ImageEmbedding with `error` set and no frame.

Back-pressure, so encoders never run ahead of what prefill workers can hold or compute:

    gateway ──▶ [ZeroMQ] ──▶ queue ──▶ pipeline ──▶ outbox (per destination, in order) ──▶ PUSH (SNDHWM 8) ──▶ prefill
                 grows while    │        starts no image for a           full: zmq.Again, the
                 the loop does  │        destination with embeddings     message stays in the outbox
                 not receive    │        waiting in the outbox (held)
                                └ full of held destinations' images, or the outbox over max_outbox_bytes:
                                  stop receiving (taking_work False)

A prefill worker drains its embedding socket only while it has room for embeddings and its engine
is not too far behind (services.workers.image_intake); once its socket and our PUSH queue to it are
full, sends fail with zmq.Again and its embeddings wait in the outbox: the destination is *held*.
The pipeline starts no image for a held destination (what the tower made would only wait); those
images stay queued, in order, while the images for other destinations start past them, so one slow
prefill worker does not stop the others' work. The queue, with the held images, shows as this
encoder's waiting load, so the router sends new images elsewhere. Once the queue is full
(`max_queued_images`) of held destinations' images, or the outbox is over `max_outbox_bytes`, this
loop takes no new requests: they wait in ZeroMQ (our input queue holds at most `max_batch_images`)
and the gateway's own sends back up. A held destination that has taken nothing for `give_up_after_s`
(a prefill worker that died: a restarted one has a new address) is given up: its embeddings in the
outbox and its queued images are dropped (`num_requests_given_up`), as the prefill worker's inbox
would have failed their requests by then. Sends never block: other destinations keep flowing while
one is full.

Load: requests taken off the socket wait in the loop's own queue (at most `max_queued_images`, then
the rest wait in ZeroMQ) until a turn takes them into the pipeline, `max_batch_images` at a time. The
two counts, images queued and images in the pipeline (preprocessing or in the tower), are the
encoder's waiting and running load
(services.common.control.EncodeStats), published on the worker's state socket with its embedding
cache's contents (services.workers.state_publisher).

Trust: an EncodeRequest's `deliver_to` must be an embedding socket a gateway registered over Ray
(services.workers.peers); one naming any other address is dropped, never connected to. With the
cluster's CURVE keys, the input and state sockets are CURVE servers and the outbox's sockets clients.

Failure policy: a malformed message is logged and dropped; an image that cannot be decoded or
preprocessed gets an error embedding (the prefill worker fails that request, with a 400 naming the
image); an unexpected exception while encoding fails that batch's images and the loop goes on.
AbortRequest drops the request's work received but not yet encoded (held or not), its images in the
pipeline (their results are never sent; preprocessing only they needed is cancelled), and its
embeddings still in the outbox.

Tunables (defaults):
    max_outbox_bytes = 256 MiB   outbox bytes past which no new request is received
    max_batch_images = 64        EncodeRequests taken per loop turn (one tower batch)
    max_queued_images = 2 x max_batch_images   EncodeRequests received and waiting for the pipeline
    pipeline_depth = 2           batches started and not yet finished (1: no overlap)
    give_up_after_s = 60.0       a held destination that takes nothing this long is dropped (the prefill
                                 inbox's own timeout for a request's embeddings)
    EMBEDDING_SEND_HWM = 8       messages queued in ZeroMQ per destination before a send fails
    input socket limit = the codec's header limit (64 MiB): an EncodeRequest's frame is an image's encoded
                         bytes, which the gateway caps far lower (20 MiB by default)
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import zmq

from services.common.channels import bind, configure, connect, drain
from services.common.codec import MessageCodec
from services.common.control import EncodeStats, WorkerStats
from services.common.messages import AbortRequest, EncodeRequest, EncoderInbound, ImageEmbedding
from services.common.security import CurveKeys, start_authenticator
from services.workers.encoder import EncodeBatch, ImageEncoder
from services.workers.peers import PeerRegistry
from services.workers.state_publisher import StatePublisher
from services.workers.wire import MAX_EMBEDDING_MESSAGE_BYTES, embedding_frame

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50  # how long an idle loop waits before checking for shutdown
EMBEDDING_SEND_HWM = 8
DEFAULT_MAX_OUTBOX_BYTES = 256 * 2**20
DEFAULT_MAX_BATCH_IMAGES = 64
DEFAULT_PIPELINE_DEPTH = 2
DEFAULT_GIVE_UP_AFTER_S = 60.0


# ----------------------------------------------------------------------------------------------
# The outbox


@dataclass
class _Outgoing:
    request_id: str
    frames: list
    num_bytes: int


class Outbox:
    """Messages waiting to leave, per destination and in order; nothing here ever blocks.

    Each destination gets one PUSH socket that queues at most `send_hwm` messages in ZeroMQ; past that
    a send fails with zmq.Again and the message waits here, retried on every `flush`. The owner
    watches `num_bytes` to stop taking work, and `held()` to start no work for a destination whose
    messages wait. One owner thread; others may read the counters.
    """

    def __init__(
        self,
        context: zmq.Context,
        send_hwm: int = EMBEDDING_SEND_HWM,
        max_message_bytes: int = MAX_EMBEDDING_MESSAGE_BYTES,
        keys: CurveKeys | None = None,
    ) -> None:
        """`keys`: the cluster's CURVE keys (destinations' embedding sockets are CURVE servers then)."""
        self._context = context
        self.send_hwm = send_hwm
        self.max_message_bytes = max_message_bytes  # a PUSH socket receives nothing: moot, kept for symmetry
        self._keys = keys
        self._sockets: dict[str, zmq.Socket] = {}
        self._queues: dict[str, deque[_Outgoing]] = {}
        # destination with messages waiting -> monotonic time it last took one (or its first one waited)
        self._waiting_since: dict[str, float] = {}
        self.num_bytes = 0  # waiting here
        self.num_bytes_sent = 0  # handed to ZeroMQ

    @property
    def num_messages(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def put(self, address: str, request_id: str, frames: list) -> None:
        """Queue a message for `address` (after the ones already waiting for it)."""
        try:
            self._socket(address)
        except zmq.ZMQError as exc:
            logger.warning("cannot send to %r (%s); the embedding of %s is dropped", address, exc, request_id)
            return
        num_bytes = sum(memoryview(f).nbytes for f in frames)
        queue = self._queues.setdefault(address, deque())
        if not queue:
            self._waiting_since[address] = time.monotonic()
        queue.append(_Outgoing(request_id, frames, num_bytes))
        self.num_bytes += num_bytes

    def flush(self) -> None:
        """Send what each destination takes now, in order; stop at a destination's first zmq.Again."""
        for address, queue in self._queues.items():
            socket = self._sockets[address]
            num_sent = 0
            while queue:
                try:
                    socket.send_multipart(queue[0].frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                sent = queue.popleft()
                num_sent += 1
                self.num_bytes -= sent.num_bytes
                self.num_bytes_sent += sent.num_bytes
            if not queue:
                self._waiting_since.pop(address, None)
            elif num_sent:
                self._waiting_since[address] = time.monotonic()

    def held(self) -> set[str]:
        """Destinations with messages waiting here: their ZeroMQ queue is full."""
        return set(self._waiting_since)

    def stalled(self, wait_s: float) -> list[str]:
        """Held destinations that have taken nothing for `wait_s`."""
        horizon = time.monotonic() - wait_s
        return [address for address, since in self._waiting_since.items() if since < horizon]

    def give_up(self, address: str) -> list[str]:
        """Forget a destination: its waiting messages (their request ids are returned) and its socket, with
        what ZeroMQ still queues for it. A later `put` for it connects again."""
        queue = self._queues.pop(address, deque())
        self._waiting_since.pop(address, None)
        self.num_bytes -= sum(m.num_bytes for m in queue)
        socket = self._sockets.pop(address, None)
        if socket is not None:
            socket.close(linger=0)
        return [m.request_id for m in queue]

    def drop(self, request_id: str) -> int:
        """Forget the request's waiting messages; returns how many."""
        num_dropped = 0
        for address, queue in self._queues.items():
            kept = deque(m for m in queue if m.request_id != request_id)
            num_dropped += len(queue) - len(kept)
            self.num_bytes -= sum(m.num_bytes for m in queue if m.request_id == request_id)
            self._queues[address] = kept
            if not kept:
                self._waiting_since.pop(address, None)
        return num_dropped

    def blocked_sockets(self) -> list[zmq.Socket]:
        """Sockets of destinations with messages waiting (poll them for POLLOUT)."""
        return [self._sockets[address] for address, queue in self._queues.items() if queue]

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()

    def _socket(self, address: str) -> zmq.Socket:
        socket = self._sockets.get(address)
        if socket is None:
            socket = configure(self._context.socket(zmq.PUSH), self.max_message_bytes)
            socket.setsockopt(zmq.SNDHWM, self.send_hwm)
            try:
                connect(socket, address, self._keys)
            except zmq.ZMQError:
                socket.close(linger=0)
                raise
            self._sockets[address] = socket
        return socket


# ----------------------------------------------------------------------------------------------
# The pipeline


class _Queued(NamedTuple):
    """A received image waiting for the pipeline."""

    message: EncodeRequest
    data: bytes
    received_s: float  # time.perf_counter() when the loop took it off the socket


class _Seconds(NamedTuple):
    """An image's time in this encoder, for its ImageEmbedding (the prefill worker's TTFT breakdown)."""

    queue_s: float = 0.0  # received -> its batch started
    decode_s: float = 0.0  # its preprocessing (0: served from the cache)
    encode_s: float = 0.0  # the rest of its batch until its rows were ready (the batch ahead, the tower)


@dataclass
class _InFlight:
    """A batch in the pipeline: its requests and the encoder's batch, item for item."""

    requests: list[EncodeRequest]
    encoding: EncodeBatch
    queue_s: list[float]  # per request, its wait in the loop's queue (received -> the batch started)

    def wanted(self) -> list[EncodeRequest]:
        """The requests not aborted since the batch started, in order (ImageEncoder.finish's results)."""
        return [self.requests[index] for index, _, _ in self.encoding.wanted()]

    def discard(self, request_id: str) -> int:
        """Drop the request's images from the batch; returns how many."""
        aborted = [index for index, _, _ in self.encoding.wanted() if self.requests[index].request_id == request_id]
        self.encoding.discard(aborted)
        return len(aborted)


# ----------------------------------------------------------------------------------------------
# The worker


class EncodeWorker:
    """One process's encode loop: owns the ImageEncoder and the sockets; `stats` may be called from other threads.

    `worker_stats` (the actor's WorkerStats) gives the worker a state socket (`state_address`) where
    the loop publishes them and the embedding cache's contents; None: no state socket.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        input_address: str,
        name: str = "encoder-0",
        *,
        max_outbox_bytes: int = DEFAULT_MAX_OUTBOX_BYTES,
        max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
        max_queued_images: int | None = None,
        pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
        give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S,
        worker_stats: Callable[[], WorkerStats] | None = None,
        keys: CurveKeys | None = None,
        peers: PeerRegistry | None = None,
    ) -> None:
        """`keys`: the cluster's CURVE keys (None: plain sockets); `peers`: the embedding sockets it may
        deliver to, filled by gateways over Ray (None: a registry of its own, empty until registered)."""
        if max_batch_images < 1:
            raise ValueError("max_batch_images must be at least 1")
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self.encoder = encoder
        self.name = name
        self.max_outbox_bytes = max_outbox_bytes
        self.max_batch_images = max_batch_images
        self.max_queued_images = max(max_queued_images or 2 * max_batch_images, max_batch_images)
        self.pipeline_depth = pipeline_depth
        self.give_up_after_s = give_up_after_s
        self._queue: deque[_Queued] = deque()  # received, waiting for the pipeline
        self._pipeline: deque[_InFlight] = deque()  # started, oldest first
        self._num_images_in_flight = 0  # in the pipeline now (read by other threads)
        self._num_startable = 0  # queued images whose destination is not held, as of the last turn's end
        self._stalled = False  # the queue is full and none of it can start (every destination held)
        self.peers = peers if peers is not None else PeerRegistry(name)
        self._context = zmq.Context()
        self._authenticator = start_authenticator(self._context, keys, name)  # before any socket binds
        self._input = configure(self._context.socket(zmq.PULL))
        # a short queue in this process, so requests we do not take back up to the gateway
        self._input.setsockopt(zmq.RCVHWM, max_batch_images)
        self.input_address = bind(self._input, input_address, keys)
        self._outbox = Outbox(self._context, keys=keys)
        self._inbound: MessageCodec[EncodeRequest | AbortRequest] = MessageCodec(EncoderInbound)
        self._outbound: MessageCodec[ImageEmbedding] = MessageCodec(ImageEmbedding)
        self._stop = threading.Event()
        self.num_requests_received = 0  # EncodeRequests taken off the socket
        self.num_requests_aborted = 0  # EncodeRequests (or their embeddings) dropped by an abort
        self.num_requests_given_up = 0  # ... dropped with a destination that took nothing for give_up_after_s
        self.publisher = (
            StatePublisher(
                self._context,
                self.input_address.rsplit(":", 1)[0] + ":0",
                name,
                None,
                worker_stats,
                embedding_cache=encoder.cache,
                keys=keys,
            )
            if worker_stats is not None
            else None
        )
        self.state_address = self.publisher.address if self.publisher is not None else None

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        logger.info("%s encoding on %s", self.name, self.input_address)
        while not self._stop.is_set():
            self._wait()
            self._receive()
            self._start_batches()  # their preprocessing runs on the pool from now on
            if self.publisher is not None:  # before the tower: the batches show as in flight while it runs
                self.publisher.publish()
            if self._pipeline:
                self._finish_oldest()  # the tower, while the pool preprocesses the batches behind it
            self._outbox.flush()
            self._note_holds()
        self._close()

    def stop(self) -> None:
        self._stop.set()

    def taking_work(self) -> bool:
        """False while the outbox is over budget, or the queue is full of images for held destinations:
        requests then wait in ZeroMQ."""
        return self._outbox_has_room() and not self._stalled

    def _outbox_has_room(self) -> bool:
        return self._outbox.num_bytes <= self.max_outbox_bytes

    def _wait(self) -> None:
        """Until a request can be taken or a held-back destination has room (at most IDLE_POLL_MS); not at
        all while a batch waits in the pipeline or queued requests can start one."""
        poller = zmq.Poller()
        if self.taking_work():
            poller.register(self._input, zmq.POLLIN)
        for socket in self._outbox.blocked_sockets():
            poller.register(socket, zmq.POLLOUT)
        poller.poll(0 if self._pipeline or (self._num_startable and self.taking_work()) else IDLE_POLL_MS)

    # ------------------------------------------------------------------ receive

    def _receive(self) -> None:
        """Requests with their image bytes into the queue until it holds max_queued_images; none while
        not taking work."""
        if not self.taking_work() or len(self._queue) >= self.max_queued_images:
            return
        for message, frames in drain(self._input, self._inbound, self.name):
            if isinstance(message, AbortRequest):
                self._abort(message.request_id)
            elif not self.peers.allows("embedding", message.deliver_to, message.request_id):
                continue  # not even an error goes back: that would connect to the address
            elif len(frames) != 2:
                self.num_requests_received += 1
                self._post(
                    message,
                    f"the encode request carries {len(frames) - 1} frames after its header; "
                    "it needs exactly one, the image's bytes",
                )
            else:
                self.num_requests_received += 1
                self._queue.append(_Queued(message, frames[1], time.perf_counter()))
            if len(self._queue) >= self.max_queued_images:
                break

    def _abort(self, request_id: str) -> None:
        """Drop the request's images: queued, in the pipeline (never sent), and waiting in the outbox."""
        kept = deque(item for item in self._queue if item.message.request_id != request_id)
        self.num_requests_aborted += len(self._queue) - len(kept) + self._outbox.drop(request_id)
        self._queue = kept
        num_in_flight = sum(batch.discard(request_id) for batch in self._pipeline)
        self._num_images_in_flight -= num_in_flight
        self.num_requests_aborted += num_in_flight

    # ------------------------------------------------------------------ the pipeline

    def _start_batches(self) -> None:
        """Queued requests into the pipeline while it has room, max_batch_images a batch, oldest first,
        past those for held destinations (none while the outbox is over budget: what the tower makes
        would only wait there)."""
        held = self._outbox.held()
        while self._queue and len(self._pipeline) < self.pipeline_depth and self._outbox_has_room():
            batch = self._take_batch(held)
            if not batch:
                break
            requests = [item.message for item in batch]
            try:
                encoding = self.encoder.start([(item.message.image, item.data) for item in batch])
            except Exception as exc:  # a bug must not take the worker down: this batch fails, the loop goes on
                self._fail(requests, exc)
                continue
            queue_s = [max(encoding.started_s - item.received_s, 0.0) for item in batch]
            self._pipeline.append(_InFlight(requests, encoding, queue_s))
            self._num_images_in_flight += len(batch)

    def _take_batch(self, held: set[str]) -> list[_Queued]:
        """Up to max_batch_images queued requests, oldest first, whose destinations are not held; the rest
        stay queued in order."""
        if not held:
            return [self._queue.popleft() for _ in range(min(self.max_batch_images, len(self._queue)))]
        batch: list[_Queued] = []
        kept: deque[_Queued] = deque()
        for item in self._queue:
            if len(batch) < self.max_batch_images and item.message.deliver_to not in held:
                batch.append(item)
            else:
                kept.append(item)
        self._queue = kept
        return batch

    def _note_holds(self) -> None:
        """After a turn's sends: give up destinations stalled for give_up_after_s, then count the queued
        images that can start (the next wait's timeout) and whether none can while the queue is full."""
        for address in self._outbox.stalled(self.give_up_after_s):
            self._give_up(address)
        held = self._outbox.held()
        self._num_startable = sum(1 for item in self._queue if item.message.deliver_to not in held)
        self._stalled = len(self._queue) >= self.max_queued_images and self._num_startable == 0

    def _give_up(self, address: str) -> None:
        """Drop what waits for a destination that has taken nothing for give_up_after_s: its embeddings in
        the outbox and its queued images (those in the pipeline come to the outbox, and go the same way)."""
        num_unsent = len(self._outbox.give_up(address))
        kept = deque(item for item in self._queue if item.message.deliver_to != address)
        num_dropped = num_unsent + len(self._queue) - len(kept)
        self._queue = kept
        self.num_requests_given_up += num_dropped
        logger.warning(
            "%s: %s has taken no embedding for %.0f s; dropped %d image(s) for it",
            self.name,
            address,
            self.give_up_after_s,
            num_dropped,
        )

    def _finish_oldest(self) -> None:
        """The oldest batch through the tower (waiting for its preprocessing first); its results to the outbox."""
        batch = self._pipeline.popleft()
        wanted = batch.encoding.wanted()
        requests = batch.wanted()
        try:
            results = self.encoder.finish(batch.encoding)
        except Exception as exc:
            self._fail(requests, exc)
        else:
            for (index, ref, _), result in zip(wanted, results):
                decode_s, encode_s = batch.encoding.item_seconds(ref.content_hash)
                self._post(batch.requests[index], result, _Seconds(batch.queue_s[index], decode_s, encode_s))
        self._num_images_in_flight -= len(requests)

    def _fail(self, requests: list[EncodeRequest], exc: Exception) -> None:
        logger.error("%s failed to encode %d image(s): %s", self.name, len(requests), traceback.format_exc())
        for message in requests:
            self._post(message, f"internal error in the encoder: {exc}")

    # ------------------------------------------------------------------ send

    def _post(self, message: EncodeRequest, result: torch.Tensor | str, seconds: _Seconds | None = None) -> None:
        """Queue one image's ImageEmbedding for the prefill worker the request names."""
        self._outbox.put(message.deliver_to, message.request_id, self._frames(message, result, seconds or _Seconds()))

    def _frames(self, message: EncodeRequest, result: torch.Tensor | str, seconds: _Seconds) -> list:
        """The header and the rows' frame, or the header alone carrying the error."""

        def header(**fields) -> ImageEmbedding:
            return ImageEmbedding(
                request_id=message.request_id,
                content_hash=message.image.content_hash,
                encoder_queue_s=seconds.queue_s,
                decode_s=seconds.decode_s,
                encode_s=seconds.encode_s,
                **fields,
            )

        if isinstance(result, torch.Tensor):
            try:
                dtype, payload = embedding_frame(result)  # [num_rows, hidden_size], copied to the host
                return self._outbound.encode(
                    header(num_rows=result.shape[0], hidden_size=result.shape[1], dtype=dtype), payload
                )
            except Exception as exc:  # e.g. a failing device copy: this image fails, the loop goes on
                logger.error("%s could not send an embedding: %s", self.name, traceback.format_exc())
                result = f"internal error in the encoder: {exc}"
        return self._outbound.encode(header(num_rows=0, hidden_size=0, dtype="", error=result))

    # ------------------------------------------------------------------ control plane

    def stats(self) -> EncodeStats:
        encode, cache = self.encoder.stats, self.encoder.cache
        return EncodeStats(
            num_images_queued=len(self._queue),
            num_images_in_flight=self._num_images_in_flight,
            num_requests_received=self.num_requests_received,
            num_requests_aborted=self.num_requests_aborted,
            num_images_encoded=encode.num_images_encoded,
            num_tower_calls=encode.num_tower_calls,
            num_encode_errors=encode.num_errors,
            encode_seconds=encode.seconds.snapshot(),
            embedding_cache_queries=cache.num_queries,
            embedding_cache_hits=cache.num_hits,
            embedding_cache_evictions=cache.num_evictions,
            embedding_cache_bytes=cache.num_bytes_used,
            embedding_cache_capacity_bytes=cache.capacity_bytes,
            embedding_bytes_sent=self._outbox.num_bytes_sent,
            outbox_bytes=self._outbox.num_bytes,
            taking_work=self.taking_work(),
            num_requests_given_up=self.num_requests_given_up,
        )

    def _close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self._outbox.close()
        self._input.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.close()
        self._context.term()
