"""A worker's requests, one record each, and the sockets their tokens stream back on.

A record lives from the GenerateRequest's arrival (or a KV transfer's completion on a decode
worker) until the request's last delta or error is sent, its abort, or its handoff to a decode
worker; every other manager keys its own state by request id and is told when a request leaves.
Each request names the output socket (`reply_to`) of the gateway that sent it, so one worker
serves any number of gateway replicas. Invariant: a record enters the table only after its reply_to
passed the worker's PeerRegistry (services.workers.peers), so ReplySender connects only to results
sockets a gateway registered over Ray.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import zmq

from services.common.channels import configure, connect
from services.common.codec import MessageCodec
from services.common.messages import GenerateRequest, OutputBatch, RequestDelta, RequestError, TTFTBreakdown
from services.common.security import CurveKeys
from services.engine.multimodal import MultiModalInputs

Reply = RequestDelta | RequestError


@dataclass(eq=False)
class RequestRecord:
    message: GenerateRequest  # as this worker serves it (a prefill worker's names its kv_target)
    multi_modal: MultiModalInputs | None = None  # a vision-language prompt's images (go along with its KV)
    hands_off: bool = False  # prefill: computes the prompt and first token, then ships the KV
    arrived_s: float = field(default_factory=time.monotonic)  # here (this worker's clock)
    # an image request: when it was handed to the engine, every embedding in, and the encoder's times for
    # the last one in (services.workers.image_intake.EncoderSeconds: queue, decode, encode)
    images_in_s: float | None = None
    encoder_seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kv_transfer_s: float | None = None  # a decode worker's imported KV: its transfer, for the first delta

    @property
    def num_top_logprobs(self) -> int:
        return self.message.sampling.logprobs or 0

    def ttft_breakdown(self, engine_queue_s: float, engine_prefill_s: float) -> TTFTBreakdown | None:
        """This worker's parts of the request's TTFT, given the engine's phases up to its first token here;
        None when that is not the request's first token (it resumes after tokens produced elsewhere)."""
        if self.message.output_token_ids:
            return None
        encoder_queue_s, decode_s, encode_s = self.encoder_seconds
        return TTFTBreakdown(
            image_wait_s=self.images_in_s - self.arrived_s if self.images_in_s is not None else 0.0,
            encoder_queue_s=encoder_queue_s,
            decode_s=decode_s,
            encode_s=encode_s,
            prefill_queue_s=engine_queue_s,
            prefill_s=engine_prefill_s,
        )


class RequestTable:
    def __init__(self) -> None:
        self._records: dict[str, RequestRecord] = {}

    def add(self, record: RequestRecord) -> None:
        self._records[record.message.request_id] = record

    def get(self, request_id: str) -> RequestRecord | None:
        return self._records.get(request_id)

    def forget(self, request_id: str) -> RequestRecord | None:
        return self._records.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)


class ReplySender:
    """One OutputBatch per gateway per loop turn; a request's record leaves with its last reply."""

    def __init__(self, context: zmq.Context, worker_name: str, keys: CurveKeys | None = None) -> None:
        self._context = context
        self._worker_name = worker_name
        self._keys = keys  # the gateways' results sockets are CURVE servers when the cluster has keys
        self._sockets: dict[str, zmq.Socket] = {}  # reply_to address -> PUSH socket
        self._codec = MessageCodec(OutputBatch)

    def send(self, replies: list[Reply], table: RequestTable) -> None:
        by_gateway: dict[str, list[Reply]] = defaultdict(list)
        for reply in replies:
            last = isinstance(reply, RequestError) or reply.finished
            record = table.forget(reply.request_id) if last else table.get(reply.request_id)
            if record is not None:
                by_gateway[record.message.reply_to].append(reply)
        for reply_to, batch in by_gateway.items():
            frames = self._codec.encode(OutputBatch(items=batch, worker=self._worker_name))
            self._socket(reply_to).send_multipart(frames, copy=False)

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)

    def _socket(self, address: str) -> zmq.Socket:
        socket = self._sockets.get(address)
        if socket is None:
            socket = connect(configure(self._context.socket(zmq.PUSH)), address, self._keys)
            self._sockets[address] = socket
        return socket
