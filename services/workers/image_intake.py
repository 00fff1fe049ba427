"""A worker's images: embeddings from encoders (or encoded here), held until their request can start.

    encoder ──ImageEmbedding──▶ embedding socket ──▶ MultiModalInbox ◀── parked GenerateRequest
    gateway ──EncodeRequest──▶ input socket ──▶ to_encode ──▶ ImageEncoder (colocated) ──┘
                                                          every image in: (request, MultiModalInputs)

Which worker has what:
  * prefill and colocated workers of a vision-language model bind an embedding socket;
  * a colocated worker with an ImageEncoder also encodes the EncodeRequests sent to it;
  * a decode worker gets a prompt's embeddings with its KV (`transfer_inputs`) and binds nothing.

Failure policy: an image that cannot be encoded fails its request with a 400, whether the request has
arrived yet or not (the reason waits for it, bounded: MAX_EARLY_FAILURES); a malformed embedding
message is logged and dropped; a parked request whose embeddings do not arrive within the inbox's
timeout fails with a 503 the client may retry. The worker's loop is the one owner: no locks.

The embedding socket is a CURVE server when the worker has the cluster's keys (encoders connect to
it), and accepts frames no larger than one image of the model can need (`max_embedding_frame_bytes`).

Tunables: MultiModalInbox's capacity_bytes and timeout_s; MAX_EARLY_FAILURES = 4096.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Container, Sequence

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

MAX_EARLY_FAILURES = 4096  # encode failures kept for requests that have not arrived yet (oldest dropped)
# an ImageEmbedding header: ids, a content hash, and with `error` the encoder's reason (a short text)
EMBEDDING_HEADER_ROOM_BYTES = 2**20


def max_embedding_frame_bytes(engine: LLMEngine) -> int:
    """The largest frame the embedding socket can legitimately receive (its ZMQ_MAXMSGSIZE): one image's
    rows, [num_rows, hidden_size] in the engine dtype (the only dtype accepted), where num_rows, the
    image's placeholder tokens, lie inside the context (at most max_model_len); or the header."""
    row_bytes = engine.runner.model.spec.hidden_size * engine.runner.dtype.itemsize
    return max(engine.max_model_len * row_bytes, EMBEDDING_HEADER_ROOM_BYTES)


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
    ) -> None:
        """`bind_address` ("tcp://host:0"), or None: no embedding socket (a decode worker); a text-only
        model binds none either. `keys`: the cluster's CURVE keys (None: a plain socket)."""
        self.name = name
        self.image_encoder = image_encoder
        self._hidden_size = engine.runner.model.spec.hidden_size
        self._dtype = dtype_name(engine.runner.dtype)
        self._text_only = engine.vision_language is None
        self._inbox = MultiModalInbox(engine.vision_language)
        self._to_encode: list[tuple[EncodeRequest, bytes]] = []
        self._early_failures: OrderedDict[str, str] = OrderedDict()  # request id -> why, request still to come
        self._codec = MessageCodec(EmbeddingInbound)
        self.socket: zmq.Socket | None = None
        self.address: str | None = None
        if bind_address is not None and not self._text_only:
            self.socket = configure(context.socket(zmq.PULL), max_embedding_frame_bytes(engine))
            self.address = bind(self.socket, bind_address, keys)

    @property
    def busy(self) -> bool:
        """Work waits here that needs the loop to turn without new input (images to encode)."""
        return bool(self._to_encode)

    # ------------------------------------------------------------------ in

    def queue_encode(self, request: EncodeRequest, data: bytes) -> None:
        """An image to encode here (a colocated worker's own requests)."""
        self._to_encode.append((request, data))

    def receive(self, arrived: Container[str]) -> list[RequestError]:
        """Drain the embedding socket while the inbox has room (a full inbox holds the encoders back)."""
        errors: list[RequestError] = []
        if self.socket is None or not self._inbox.has_room:
            return errors
        for message, frames in drain(self.socket, self._codec, self.name):
            try:
                rows = self._embedding_rows(message, frames[1:])
            except ValueError as exc:  # DecodeError included
                logger.warning("%s dropped a malformed embedding: %s", self.name, exc)
                continue
            if isinstance(rows, str):
                errors.append(self.fail(message.request_id, rows, message.request_id in arrived))
            else:
                self._inbox.add_embedding(message.request_id, message.content_hash, rows)
            if not self._inbox.has_room:
                break
        return errors

    def park(self, message: GenerateRequest) -> RequestError | None:
        """A request with images: it waits here until every embedding is in (then `take_ready`)."""
        reason = self._early_failures.pop(message.request_id, None)
        if reason is not None:
            return _image_error(message.request_id, reason)
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
        if self.image_encoder is None:  # a worker of a text model, or a prefill worker: not its job
            results: Sequence[torch.Tensor | str] = ["this worker does not encode images"] * len(work)
        else:
            results = self.image_encoder.encode([(request.image, data) for request, data in work])
        errors = []
        for (request, _), result in zip(work, results):
            if isinstance(result, str):
                errors.append(self.fail(request.request_id, result, request.request_id in arrived))
            else:
                self._inbox.add_embedding(request.request_id, request.image.content_hash, result)
        return errors

    # ------------------------------------------------------------------ out

    def take_ready(self) -> list[tuple[GenerateRequest, MultiModalInputs]]:
        return self._inbox.take_ready()

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

    def fail(self, request_id: str, reason: str, arrived: bool) -> RequestError:
        """Fail a request whose image could not be encoded (now, or when its GenerateRequest arrives)."""
        self._inbox.drop(request_id)
        if not arrived:
            self._early_failures[request_id] = reason
            if len(self._early_failures) > MAX_EARLY_FAILURES:
                self._early_failures.popitem(last=False)
        return _image_error(request_id, reason)

    def drop(self, request_id: str) -> None:
        self._inbox.drop(request_id)
        self._early_failures.pop(request_id, None)

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

    def _embedding_rows(self, message: ImageEmbedding, frames: list) -> torch.Tensor | str:
        """The rows an ImageEmbedding carries (checked against its header), or the encoder's error."""
        if message.error is not None:
            return message.error
        if len(frames) != 1 or message.dtype != self._dtype:
            raise ValueError(f"embedding of {message.request_id} has {len(frames)} frames, dtype {message.dtype}")
        return embedding_from_frame(message, frames[0])


def _image_error(request_id: str, reason: str) -> RequestError:
    return RequestError(request_id=request_id, message=f"an image could not be encoded: {reason}")
