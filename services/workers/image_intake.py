"""A worker's images: embeddings from encoders (or encoded here), held until their request can start.

    encoder ──ImageEmbedding──▶ embedding socket ──▶ MultiModalInbox ◀── parked GenerateRequest
    gateway ──EncodeRequest──▶ input socket ──▶ to_encode ──▶ ImageEncoder (colocated) ──┘
                                                          every image in: (request, MultiModalInputs)

Which worker has what:
  * prefill and colocated workers of a vision-language model bind an embedding socket;
  * a colocated worker with an ImageEncoder also encodes the EncodeRequests sent to it;
  * a decode worker gets a prompt's embeddings with its KV (`transfer_inputs`) and binds nothing.

Failure policy: an image that cannot be encoded (the encoder's reason: undecodable data, a wrong
hash, a tower failure) fails its request with a 400 that names the image as the gateway does
("image 2 could not be encoded: it is truncated or corrupt ...", param "messages", numbered from 1 in
the request's order), whether the request has arrived yet or not (the reason waits for it). A failed
request is remembered (bounded: MAX_FAILURES, oldest forgotten), so the embeddings of its other images
still on the way are dropped on arrival instead of waiting out the inbox's timeout; so is an embedding
or failure for a request that has started already (a repeated image's second copy). A malformed
embedding message is logged and dropped; a parked request whose embeddings do not arrive within the
inbox's timeout fails with a 503 the client may retry. The worker's loop is the one owner: no locks.

The embedding socket is a CURVE server when the worker has the cluster's keys (encoders connect to
it), and accepts frames no larger than one image of the model can need (`max_embedding_frame_bytes`).

Back-pressure from prefill progress. The inbox bounds the bytes of embeddings waiting for their
requests, but once a request has all its images it leaves for the engine's waiting queue, embeddings
and all, and nothing bounded that queue: encoders could run any distance ahead of prefill. So the
intake counts the prompt tokens of image requests it has handed to the engine that no engine step
has taken yet (ReadyPrompts), and stops draining the embedding socket while they reach
`max_ready_tokens`:

    ready tokens >= max_ready_tokens ─▶ the socket is not drained ─▶ its ZeroMQ queue (EMBEDDING_RECEIVE_HWM
    per encoder) and each encoder's send queue fill ─▶ the encoder's outbox holds this worker's embeddings
    and it starts no more images for it (services.workers.encode_worker) ─▶ its queue grows, then it stops
    receiving; the router sees its queue

Draining resumes at the first turn after an engine step has taken enough of those requests (or they
left: aborted, failed). No deadlock: only requests whose every image is in count, and the engine
takes them without any further embedding (it needs KV room, which running requests free on their
own), so the pause always ends while the engine steps; a request with some images still to come
(split over several encoders) holds nothing the count waits for, and its remaining embeddings are
drained once the pause ends. A request with more prompt tokens than the bound is never held back (the
count stops the drain only while it has reached the bound: one request always gets in).

Tunables: MultiModalInbox's capacity_bytes and timeout_s; MAX_FAILURES = 4096; max_ready_tokens =
2 x the engine's max_num_batched_tokens (two full prefill steps of image prompts ready, so the engine
never waits for the encoders while they are ahead); EMBEDDING_RECEIVE_HWM = 8.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from typing import NamedTuple

import torch
import zmq

from services.common.channels import bind, configure, drain
from services.common.codec import MessageCodec
from services.common.messages import (
    EmbeddingInbound,
    EncodeRequest,
    GenerateRequest,
    ImageEmbedding,
    KVTransfer,
    RequestError,
)
from services.common.security import CurveKeys
from services.engine import LLMEngine
from services.engine.multimodal import MultiModalInputs
from services.workers.multimodal_inbox import MultiModalInbox
from services.workers.wire import dtype_name, embedding_from_frame, rows_from_frame

logger = logging.getLogger(__name__)

MAX_FAILURES = 4096  # requests failed for an image, remembered to drop what still comes for them (oldest forgotten)
# embeddings ZeroMQ queues on the embedding socket per encoder while the loop does not drain it: the default
# (10,000) would let an encoder run thousands of images ahead of a worker that holds back
EMBEDDING_RECEIVE_HWM = 8
# an ImageEmbedding header: ids, a content hash, and with `error` the encoder's reason (a short text)
EMBEDDING_HEADER_ROOM_BYTES = 2**20


def max_embedding_frame_bytes(engine: LLMEngine) -> int:
    """The largest frame the embedding socket can legitimately receive (its ZMQ_MAXMSGSIZE): one image's
    rows, [num_rows, hidden_size] in the engine dtype (the only dtype accepted), where num_rows, the
    image's placeholder tokens, lie inside the context (at most max_model_len); or the header."""
    row_bytes = engine.runner.model.spec.hidden_size * engine.runner.dtype.itemsize
    return max(engine.max_model_len * row_bytes, EMBEDDING_HEADER_ROOM_BYTES)


class EncoderSeconds(NamedTuple):
    """One image's time in its encoder, as its ImageEmbedding reported it (the encoder's clock)."""

    queue_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0


class ReadyPrompts:
    """Image requests handed to the engine that no engine step has taken yet, and their prompt tokens: the
    prefill work the encoders are ahead by. `awaits_first_step(request_id)` asks the engine."""

    def __init__(self, awaits_first_step: Callable[[str], bool]) -> None:
        self._awaits_first_step = awaits_first_step
        self._num_tokens: dict[str, int] = {}  # request id -> prompt tokens
        self.num_tokens = 0

    def __len__(self) -> int:
        return len(self._num_tokens)

    def request_ids(self) -> list[str]:
        return list(self._num_tokens)

    def add(self, request_id: str, num_tokens: int) -> None:
        self.remove(request_id)
        self._num_tokens[request_id] = num_tokens
        self.num_tokens += num_tokens

    def remove(self, request_id: str) -> None:
        self.num_tokens -= self._num_tokens.pop(request_id, 0)

    def forget_started(self) -> None:
        """Drop the requests a step has taken since, or that left the engine."""
        for request_id in [r for r in self._num_tokens if not self._awaits_first_step(r)]:
            self.remove(request_id)


class ImageIntake:
    def __init__(
        self,
        engine: LLMEngine,
        context: zmq.Context,
        bind_address: str | None,
        name: str,
        image_encoder=None,
        *,
        keys: CurveKeys | None = None,
        max_ready_tokens: int | None = None,
    ) -> None:
        """`bind_address` ("tcp://host:0"), or None: no embedding socket (a decode worker); a text-only
        model binds none either. `keys`: the cluster's CURVE keys (None: a plain socket).
        `max_ready_tokens`: see the module doc (None: 2 x the engine's max_num_batched_tokens)."""
        self.name = name
        self.image_encoder = image_encoder
        self._hidden_size = engine.runner.model.spec.hidden_size
        self._dtype = dtype_name(engine.runner.dtype)
        self._text_only = engine.vision_language is None
        self._inbox = MultiModalInbox(engine.vision_language)
        self.max_ready_tokens = max_ready_tokens or 2 * engine.config.max_num_batched_tokens
        self.ready = ReadyPrompts(engine.awaits_first_step)
        self._to_encode: list[tuple[EncodeRequest, bytes]] = []
        # request id -> (content hash, why) of its failed image while the request is still to come; None
        # once the request has been answered
        self._failed: OrderedDict[str, tuple[str, str] | None] = OrderedDict()
        self._codec = MessageCodec(EmbeddingInbound)
        # request id -> its latest embedding's EncoderSeconds (the slowest image once all are in), until
        # `take_encoder_seconds`; bounded like _failed (a request that never comes leaves no trace for long)
        self._encoder_seconds: OrderedDict[str, EncoderSeconds] = OrderedDict()
        self.socket: zmq.Socket | None = None
        self.address: str | None = None
        if bind_address is not None and not self._text_only:
            self.socket = configure(context.socket(zmq.PULL), max_embedding_frame_bytes(engine))
            self.socket.setsockopt(zmq.RCVHWM, EMBEDDING_RECEIVE_HWM)
            self.address = bind(self.socket, bind_address, keys)

    @property
    def num_pending(self) -> int:
        """Requests parked here and embeddings held for requests."""
        return self._inbox.num_pending

    @property
    def busy(self) -> bool:
        """Work waits here that needs the loop to turn without new input (images to encode)."""
        return bool(self._to_encode)

    @property
    def holding_back(self) -> bool:
        """The engine has max_ready_tokens of image prompts not yet started: the embedding socket waits."""
        return self.ready.num_tokens >= self.max_ready_tokens

    # ------------------------------------------------------------------ in

    def queue_encode(self, request: EncodeRequest, data: bytes) -> None:
        """An image to encode here (a colocated worker's own requests)."""
        self._to_encode.append((request, data))

    def receive(self, arrived: Container[str]) -> list[RequestError]:
        """Drain the embedding socket while the inbox has room and the engine is not max_ready_tokens behind
        (either holds the encoders back: see the module doc)."""
        errors: list[RequestError] = []
        self.ready.forget_started()
        if self.socket is None or not self._inbox.has_room or self.holding_back:
            return errors
        num_ready_tokens = self.ready.num_tokens  # and those of the requests this drain completes
        for message, frames in drain(self.socket, self._codec, self.name):
            request_id = message.request_id
            if not self._waits_for_images(request_id, arrived):
                continue
            try:
                rows = self._embedding_rows(message, frames[1:])
            except ValueError as exc:  # DecodeError included
                logger.warning("%s dropped a malformed embedding: %s", self.name, exc)
                continue
            if isinstance(rows, str):
                errors += self.fail(request_id, message.content_hash, rows, request_id in arrived)
            else:
                seconds = EncoderSeconds(message.encoder_queue_s, message.decode_s, message.encode_s)
                self._note_encoder_seconds(request_id, seconds)
                if self._inbox.add_embedding(request_id, message.content_hash, rows):
                    num_ready_tokens += self._inbox.num_prompt_tokens(request_id)
            if not self._inbox.has_room or num_ready_tokens >= self.max_ready_tokens:
                break
        return errors

    def park(self, message: GenerateRequest) -> RequestError | None:
        """A request with images: it waits here until every embedding is in (then `take_ready`)."""
        request_id = message.request_id
        if request_id in self._failed:
            failure = self._failed.pop(request_id)
            if failure is not None:  # an image failed before the request arrived
                self._remember_failed(request_id, None)
                self._inbox.drop(request_id)
                return _image_error(message, *failure)
        if self._text_only:
            return RequestError(
                request_id=message.request_id,
                param="messages",
                message="this model is text-only and does not accept image input",
            )
        self._inbox.park(message)
        return None

    def encode_queued(self, arrived: Container[str]) -> list[RequestError]:
        """Encode what this worker was asked to (colocated); a worker without an encoder refuses."""
        if not self._to_encode:
            return []
        work, self._to_encode = self._to_encode, []
        batch = None
        if self.image_encoder is None:  # a worker of a text model, or a prefill worker: not its job
            results: Sequence[torch.Tensor | str] = ["this worker does not encode images"] * len(work)
        else:
            batch = self.image_encoder.start([(request.image, data) for request, data in work])
            results = self.image_encoder.finish(batch)
        errors: list[RequestError] = []
        for (request, _), result in zip(work, results):
            if not self._waits_for_images(request.request_id, arrived):
                continue
            if isinstance(result, str):
                errors += self.fail(
                    request.request_id, request.image.content_hash, result, request.request_id in arrived
                )
            else:
                if batch is not None:  # encoded in this loop's turn: no queue of its own
                    seconds = EncoderSeconds(0.0, *batch.item_seconds(request.image.content_hash))
                    self._note_encoder_seconds(request.request_id, seconds)
                self._inbox.add_embedding(request.request_id, request.image.content_hash, result)
        return errors

    # ------------------------------------------------------------------ out

    def take_ready(self) -> list[tuple[GenerateRequest, MultiModalInputs]]:
        """Requests whose every image is in, for the engine; counted as ready until a step takes them."""
        ready = self._inbox.take_ready()
        for message, _ in ready:
            self.ready.add(message.request_id, len(message.prompt_token_ids))
        return ready

    def expire(self) -> list[RequestError]:
        return [
            RequestError(
                request_id=message.request_id,
                type="service_unavailable",
                status=503,
                message="the request's image embeddings did not arrive in time; retry",
            )
            for message in self._inbox.expire()
        ]

    def take_encoder_seconds(self, request_id: str) -> EncoderSeconds | None:
        """The encoder's times for the request's last embedding in (None: it had none, or they are forgotten)."""
        return self._encoder_seconds.pop(request_id, None)

    def _note_encoder_seconds(self, request_id: str, seconds: EncoderSeconds) -> None:
        self._encoder_seconds.pop(request_id, None)
        self._encoder_seconds[request_id] = seconds
        if len(self._encoder_seconds) > MAX_FAILURES:
            self._encoder_seconds.popitem(last=False)

    def fail(self, request_id: str, content_hash: str, reason: str, arrived: bool) -> list[RequestError]:
        """Fail a request whose image could not be encoded: its error now if it waits here, else when its
        GenerateRequest arrives (`park`)."""
        parked = self._inbox.parked(request_id)
        self._inbox.drop(request_id)
        self._remember_failed(request_id, None if parked is not None else (content_hash, reason))
        return [_image_error(parked, content_hash, reason)] if parked is not None else []

    def drop(self, request_id: str) -> None:
        """The request is gone (aborted): its embeddings, any failure kept for it, and its ready count."""
        self._inbox.drop(request_id)
        self._failed.pop(request_id, None)
        self._encoder_seconds.pop(request_id, None)
        self.ready.remove(request_id)

    def transfer_inputs(self, transfer: KVTransfer, frames: list) -> MultiModalInputs:
        """Decode side: a transfer's image embeddings (one frame each, after its header) as engine inputs."""
        images = transfer.request.images
        if len(frames) != len(images):
            raise ValueError(f"{len(images)} images but {len(frames)} embedding frames")
        rows = [
            rows_from_frame(frame, ref.length, self._hidden_size, self._dtype) for ref, frame in zip(images, frames)
        ]
        return self._inbox.inputs(transfer.request.prompt_token_ids, images, rows)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)

    def _waits_for_images(self, request_id: str, arrived: Container[str]) -> bool:
        """Whether an embedding (or failure) for the request is still of use: not if the request failed
        already, nor if it has started (arrived and no longer parked: a repeated image's second copy)."""
        if request_id in self._failed:
            return False
        return request_id not in arrived or self._inbox.parked(request_id) is not None

    def _remember_failed(self, request_id: str, failure: tuple[str, str] | None) -> None:
        self._failed[request_id] = failure
        if len(self._failed) > MAX_FAILURES:
            self._failed.popitem(last=False)

    def _embedding_rows(self, message: ImageEmbedding, frames: list) -> torch.Tensor | str:
        """The rows an ImageEmbedding carries (checked against its header), or the encoder's error."""
        if message.error is not None:
            return message.error
        if len(frames) != 1 or message.dtype != self._dtype:
            raise ValueError(f"embedding of {message.request_id} has {len(frames)} frames, dtype {message.dtype}")
        return embedding_from_frame(message, frames[0])


def _image_error(message: GenerateRequest, content_hash: str, reason: str) -> RequestError:
    """The 400 for a request whose image could not be encoded, naming the image as the gateway does: by its
    place among the request's images, from 1 (the first with that content hash)."""
    hashes = [ref.content_hash for ref in message.images]
    label = f"image {hashes.index(content_hash) + 1}" if content_hash in hashes else "an image"
    return RequestError(
        request_id=message.request_id, message=f"{label} could not be encoded: {reason}", param="messages"
    )
