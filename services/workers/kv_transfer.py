"""KV transfer between a prefill worker and a decode worker over ZeroMQ.

    prefill                                         decode
    first token sampled, blocks held (hold_kv)
    KVTransfer (request, layout)  ───────────────▶  check layout, reserve blocks (import_request)
    KVLayers [0, g)   + raw frame ─────────────────▶  write into its own paged cache (import_kv)
    KVLayers [g, 2g)  + raw frame ─────────────────▶  ...
    ...                                              all layers in: commit_import, start decoding
    free blocks  ◀───────────────────────────────── KVAck(accepted)

The bytes travel as raw frames after a msgpack header (never pickled), `LAYERS_PER_MESSAGE` layers
at a time so the decode side writes each group while later ones are still on the wire.

Failure policy: prefill holds the blocks until the ack or until `lease_s` passes, whichever comes
first, so a decode worker that never answers cannot pin them. A decode worker that refuses (no room,
layout mismatch) or whose transfer does not complete within `timeout_s` recomputes the prompt itself
(prompt plus the first token, which is not streamed again): the client sees one complete stream.

Tunables (defaults):
    LAYERS_PER_MESSAGE = 4     layers per KVLayers frame
    lease_s = 30.0             longest a prefill worker holds a request's blocks without an ack
    timeout_s = 10.0           longest a decode worker waits for a transfer before recomputing
    MAX_KV_MESSAGE_BYTES = 4 GiB   largest frame a decode worker accepts
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import zmq

from services.common.channels import configure
from services.common.codec import MessageCodec
from services.common.messages import KVAck, KVInbound, KVLayers, KVLayout, KVTransfer, WorkerInbound
from services.engine import LLMEngine

logger = logging.getLogger(__name__)

LAYERS_PER_MESSAGE = 4
MAX_KV_MESSAGE_BYTES = 4 * 2**30


TRANSFER_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class TransferStats:
    """Counters a worker exports (tristage:kv_transfer_* metrics)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds_sending: float = 0.0
    transfers_completed: int = 0
    failures: int = 0  # refused, timed out, or lease expired
    fallbacks: int = 0  # decode recomputed the prompt instead
    seconds_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(TRANSFER_SECONDS_BUCKETS) + 1))

    def observe_seconds(self, seconds: float) -> None:
        self.seconds_sending += seconds
        index = next((i for i, bound in enumerate(TRANSFER_SECONDS_BUCKETS) if seconds <= bound),
                     len(TRANSFER_SECONDS_BUCKETS))
        self.seconds_bucket_counts[index] += 1

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """(upper bound, count at or below it), ending with +Inf, as Prometheus histograms are."""
        total, result = 0, []
        for bound, count in zip((*TRANSFER_SECONDS_BUCKETS, float("inf")), self.seconds_bucket_counts):
            total += count
            result.append((bound, total))
        return result


def engine_layout(engine: LLMEngine, model_name: str) -> KVLayout:
    spec = engine.runner.model.spec
    return KVLayout(model=model_name, num_layers=spec.num_layers, block_size=engine.config.block_size,
                    num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=engine.config.dtype)


class KVSender:
    """Prefill side: ships a held request's KV, then frees its blocks on ack or lease expiry."""

    def __init__(self, engine: LLMEngine, context: zmq.Context, layout: KVLayout, ack_to: str,
                 lease_s: float = 30.0, stats: TransferStats | None = None) -> None:
        self.engine = engine
        self.layout = layout
        self.ack_to = ack_to
        self.lease_s = lease_s
        self.stats = stats or TransferStats()
        self._context = context
        self._sockets: dict[str, zmq.Socket] = {}
        self._leases: dict[str, float] = {}  # request id -> monotonic deadline
        self._codec = MessageCodec(KVInbound)

    def send(self, transfer: KVTransfer, kv_address: str) -> None:
        socket = self._socket(kv_address)
        start = time.perf_counter()
        socket.send_multipart(self._codec.encode(transfer))
        num_layers = self.layout.num_layers
        for layer_start in range(0, num_layers, LAYERS_PER_MESSAGE):
            layer_end = min(layer_start + LAYERS_PER_MESSAGE, num_layers)
            group = torch.stack([self.engine.export_kv(transfer.request_id, layer)
                                 for layer in range(layer_start, layer_end)])  # [layers, 2, blocks, bs, heads, dim]
            payload = group.cpu().contiguous().view(torch.uint8).numpy()
            header = KVLayers(request_id=transfer.request_id, layer_start=layer_start, layer_end=layer_end,
                              num_blocks=group.shape[2])
            socket.send_multipart(self._codec.encode(header, memoryview(payload).cast("B")), copy=False)
            self.stats.bytes_sent += payload.nbytes
        self.stats.observe_seconds(time.perf_counter() - start)
        self._leases[transfer.request_id] = time.monotonic() + self.lease_s

    def on_ack(self, ack: KVAck) -> None:
        if self._leases.pop(ack.request_id, None) is None:
            return
        self.engine.release_kv(ack.request_id)
        if ack.accepted:
            self.stats.transfers_completed += 1
        else:
            self.stats.failures += 1
            logger.warning("decode refused the KV of %s: %s", ack.request_id, ack.message)

    def expire_leases(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, deadline in self._leases.items() if deadline < now]:
            del self._leases[request_id]
            self.engine.release_kv(request_id)
            self.stats.failures += 1
            logger.warning("KV lease of %s expired without an ack; blocks freed", request_id)

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)

    def _socket(self, address: str) -> zmq.Socket:
        if address not in self._sockets:
            socket = configure(self._context.socket(zmq.PUSH), MAX_KV_MESSAGE_BYTES)
            socket.connect(address)
            self._sockets[address] = socket
        return self._sockets[address]


@dataclass
class _Import:
    transfer: KVTransfer
    deadline: float
    layers_done: set[int] = field(default_factory=set)


@dataclass
class Resume:
    """A request the decode worker must serve by recomputing (its KV did not arrive)."""

    transfer: KVTransfer
    reason: str


class KVReceiver:
    """Decode side: reserves blocks, writes arriving layers, acks, and hands back what must be recomputed."""

    def __init__(self, engine: LLMEngine, context: zmq.Context, socket: zmq.Socket, layout: KVLayout,
                 timeout_s: float = 10.0, stats: TransferStats | None = None) -> None:
        self.engine = engine
        self.layout = layout
        self.timeout_s = timeout_s
        self.stats = stats or TransferStats()
        self.socket = socket
        self._context = context
        self._acks: dict[str, zmq.Socket] = {}
        self._imports: dict[str, _Import] = {}
        self._codec = MessageCodec(KVInbound)
        self._ack_codec = MessageCodec(WorkerInbound)

    def receive(self) -> tuple[list[KVTransfer], list[Resume]]:
        """Drain the KV socket. Returns (transfers now complete, requests to recompute)."""
        completed, resumes = [], []
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = self._codec.decode(frames)
            if isinstance(message, KVTransfer):
                resume = self._open(message)
                if resume is not None:
                    resumes.append(resume)
            else:
                done = self._write(message, frames[1:])
                if done is not None:
                    completed.append(done)
        return completed, resumes + self._expire()

    def abort(self, request_id: str) -> bool:
        entry = self._imports.pop(request_id, None)
        if entry is None:
            return False
        self.engine.abort_request(request_id)
        self._ack(entry.transfer, accepted=False, message="aborted")
        return True

    @property
    def num_pending(self) -> int:
        return len(self._imports)

    def close(self) -> None:
        for socket in self._acks.values():
            socket.close(linger=0)

    def _open(self, transfer: KVTransfer) -> Resume | None:
        if transfer.layout != self.layout:
            self._ack(transfer, accepted=False, message=f"layout {transfer.layout} != {self.layout}")
            return Resume(transfer, f"KV layout mismatch: prefill {transfer.layout}, decode {self.layout}")
        from services.workers.engine_worker import sampling_params  # the one mapping of the wire form

        block_ids = self.engine.import_request(transfer.request_id, transfer.prompt_token_ids,
                                               transfer.output_token_ids, sampling_params(transfer.sampling),
                                               cache_salt=transfer.cache_salt)
        if block_ids is None:
            self._ack(transfer, accepted=False, message="no KV room on the decode worker")
            return Resume(transfer, "no KV room")
        self._imports[transfer.request_id] = _Import(transfer, time.monotonic() + self.timeout_s)
        return None

    def _write(self, header: KVLayers, frames: list) -> KVTransfer | None:
        entry = self._imports.get(header.request_id)
        if entry is None:  # aborted or timed out already
            return None
        layout = self.layout
        dtype = self.engine.runner.dtype
        data = torch.frombuffer(frames[0].buffer, dtype=torch.uint8)
        shape = (header.layer_end - header.layer_start, 2, header.num_blocks, layout.block_size,
                 layout.num_kv_heads, layout.head_dim)
        group = data.view(dtype).reshape(shape)
        for offset, layer in enumerate(range(header.layer_start, header.layer_end)):
            self.engine.import_kv(header.request_id, layer, group[offset])
            entry.layers_done.add(layer)
        self.stats.bytes_received += data.numel()
        if len(entry.layers_done) < layout.num_layers:
            return None
        del self._imports[header.request_id]
        self.engine.commit_import(header.request_id)
        self._ack(entry.transfer, accepted=True)
        return entry.transfer

    def _expire(self) -> list[Resume]:
        now = time.monotonic()
        resumes = []
        for request_id in [r for r, e in self._imports.items() if e.deadline < now]:
            entry = self._imports.pop(request_id)
            self.engine.abort_request(request_id)  # frees the reserved blocks
            self._ack(entry.transfer, accepted=False, message="transfer timed out")
            resumes.append(Resume(entry.transfer, "transfer timed out"))
        return resumes

    def _ack(self, transfer: KVTransfer, accepted: bool, message: str = "") -> None:
        if not accepted:
            self.stats.failures += 1
        socket = self._acks.get(transfer.ack_to)
        if socket is None:
            socket = configure(self._context.socket(zmq.PUSH))
            socket.connect(transfer.ack_to)
            self._acks[transfer.ack_to] = socket
        ack = KVAck(request_id=transfer.request_id, accepted=accepted, message=message)
        socket.send_multipart(self._ack_codec.encode(ack))
