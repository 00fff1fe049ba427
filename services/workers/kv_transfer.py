"""KV transfer between a prefill worker and a decode worker: ZeroMQ for control, shared memory or frames for bytes.

    prefill                                         decode
    first token sampled, blocks held (hold_kv)
    KVTransfer (request, layout)  ───────────────▶  check layout, reserve blocks (import_request)
    stage layer groups into host staging (side CUDA stream); once staged, free the GPU blocks
    KVLayers [0, g)   + bytes ─────────────────────▶  write into its own paged cache (import_kv)
    KVLayers [g, 2g)  + bytes ─────────────────────▶  ...
    ...                                              all layers in: commit_import, start decoding
    free staging  ◀──────────────────────────────── KVAck(accepted), once the copies to its GPU are done

"+ bytes" is one of two things (services.workers.kv_staging):
  * same host (the decode worker's `host_id` equals ours): a StagingRef into our shared-memory
    staging file; the decode worker copies from that memory straight to its GPU (pinned on both
    sides, so both copies are DMA at PCIe speed and nothing is copied through a socket);
  * otherwise: a raw frame after the msgpack header (never pickled), over `KV_STREAMS` connections
    that take layer groups in turn.
Without room in the staging buffer (or with staging off) a request's groups are copied to the host
and sent as frames at once, and its GPU blocks stay held until the ack.

Failure policy: prefill holds what a request took (GPU blocks until staged, staging until the ack)
no longer than `lease_s`, so a decode worker that never answers cannot pin them. A decode worker
that refuses (no room, layout mismatch, staging file not visible) or whose transfer does not
complete within `timeout_s` recomputes the prompt itself (prompt plus the first token, which is not
streamed again): the client sees one complete stream. A decode worker that could not read the
staging file is sent frames from then on.

Tunables (defaults):
    LAYERS_PER_MESSAGE = 4     layers per KVLayers message
    KV_STREAMS = 4             connections per decode worker for frames
    lease_s = 30.0             longest a prefill worker holds a request's KV without an ack
    timeout_s = 10.0           longest a decode worker waits for a transfer before recomputing
    MAX_KV_MESSAGE_BYTES = 4 GiB   largest frame a decode worker accepts
    MAX_EARLY_BYTES = 2 GiB    groups a decode worker keeps while their KVTransfer is still on the way
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import zmq

from services.common.channels import configure
from services.common.codec import MessageCodec
from services.common.messages import (KVAck, KVInbound, KVLayers, KVLayout, KVTarget, KVTransfer, StagingRef,
                                      WorkerInbound)
from services.common.errors import InvalidRequestError
from services.common.histogram import SecondsHistogram
from services.engine import LLMEngine
from services.engine.multimodal import MultiModalInputs
from services.workers.kv_staging import StagingBuffer, StagingReader

logger = logging.getLogger(__name__)

LAYERS_PER_MESSAGE = 4
KV_STREAMS = 4
MAX_KV_MESSAGE_BYTES = 4 * 2**30
MAX_EARLY_BYTES = 2 * 2**30


@dataclass
class TransferStats:
    """Counters a worker exports (tristage:kv_transfer_* metrics)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_completed: int = 0
    failures: int = 0  # refused, timed out, or lease expired
    fallbacks: int = 0  # decode recomputed the prompt instead
    seconds: SecondsHistogram = field(default_factory=SecondsHistogram)  # one request's KV, first byte to ack


def engine_layout(engine: LLMEngine, model_name: str) -> KVLayout:
    spec = engine.runner.model.spec
    return KVLayout(model=model_name, num_layers=spec.num_layers, block_size=engine.config.block_size,
                    num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=engine.config.dtype)


@dataclass
class _Group:
    """One staged layer group: its header, and the copy that must finish before the header leaves."""

    header: KVLayers
    payload: torch.Tensor  # uint8 view of the staging region (sent as a frame unless the header references it)
    copied: "torch.cuda.Event | None"  # None: the copy already finished (CPU)
    source: torch.Tensor | None = None  # the gathered GPU blocks, kept alive until the copy finishes

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()


@dataclass
class _Shipment:
    """A request whose KV is on its way: what it still holds, and until when."""

    transfer: KVTransfer
    kv_address: str
    start_s: float  # perf_counter at the first byte
    lease_deadline: float  # monotonic
    holds_blocks: bool  # GPU blocks are freed once staged, else on the ack
    region: int | None = None  # staging offset, freed on the ack
    groups: deque[_Group] = field(default_factory=deque)  # staged, not yet sent


class KVSender:
    """Prefill side: ships a held request's KV, then frees its blocks and staging on ack or lease expiry.

    With staging (the default) `send` only queues copies on a side CUDA stream and returns; `poll`,
    called every loop turn, sends each layer group once its copy is done, and frees the request's
    GPU blocks as soon as all of its groups are staged. Without room in the staging buffer (or with
    staging off), a request goes out the plain way: copied to the host and sent inside `send`.
    """

    def __init__(self, engine: LLMEngine, context: zmq.Context, layout: KVLayout, ack_to: str,
                 lease_s: float = 30.0, stats: TransferStats | None = None, *,
                 staging: StagingBuffer | None = None, host_id: str = "", num_streams: int = KV_STREAMS) -> None:
        self.engine = engine
        self.layout = layout
        self.ack_to = ack_to
        self.lease_s = lease_s
        self.stats = stats or TransferStats()
        self.staging = staging
        self.host_id = host_id
        self.num_streams = num_streams
        self._context = context
        self._sockets: dict[str, list[zmq.Socket]] = {}
        self._shipments: dict[str, _Shipment] = {}
        self._no_shared_memory: set[str] = set()  # decode workers that could not read our staging file
        self._codec = MessageCodec(KVInbound)
        self._copy_stream = _side_stream(engine)

    def send(self, transfer: KVTransfer, target: KVTarget, embeddings: Sequence[memoryview] = ()) -> None:
        """Open the transfer (with a vision-language prompt's image `embeddings` as frames) and ship the KV."""
        request_id = transfer.request_id
        sockets = self._socket(target.kv_address)
        sockets[0].send_multipart(self._codec.encode(transfer, *embeddings))
        num_blocks = len(self.engine.kv_cache.block_ids(request_id))
        layer_bytes = self._layer_bytes(num_blocks)
        region = self.staging.allocator.allocate(layer_bytes * self.layout.num_layers) if self.staging else None
        shipment = _Shipment(transfer, target.kv_address, time.perf_counter(), time.monotonic() + self.lease_s,
                             holds_blocks=True, region=region)
        self._shipments[request_id] = shipment
        if region is None:
            self._send_unstaged(shipment, sockets)
            return
        shared = (target.host_id == self.host_id and bool(self.host_id)
                  and target.kv_address not in self._no_shared_memory)
        for layer_start, layer_end in self._groups():
            offset = region + layer_start * layer_bytes
            nbytes = (layer_end - layer_start) * layer_bytes
            ref = StagingRef(name=self.staging.name, offset=offset, nbytes=nbytes) if shared else None
            header = KVLayers(request_id=request_id, layer_start=layer_start, layer_end=layer_end,
                              num_blocks=num_blocks, staging=ref)
            shipment.groups.append(self._stage(request_id, header, self.staging.view(offset, nbytes)))
        self.poll()

    def poll(self) -> None:
        """Send every staged group whose copy is done (in order per request); free staged GPU blocks."""
        for shipment in self._shipments.values():
            sockets = self._sockets[shipment.kv_address]
            while shipment.groups and shipment.groups[0].ready():
                group = shipment.groups.popleft()
                self._send_group(sockets, group.header, None if group.header.staging else group.payload)
                self.stats.bytes_sent += group.payload.numel()
            if not shipment.groups and shipment.holds_blocks:
                self.engine.release_kv(shipment.transfer.request_id)  # the bytes are in staging now
                shipment.holds_blocks = False

    def on_ack(self, ack: KVAck) -> None:
        shipment = self._shipments.get(ack.request_id)
        if shipment is None:
            return
        self._finish(shipment)
        if ack.accepted:
            self.stats.transfers_completed += 1
            self.stats.seconds.observe(time.perf_counter() - shipment.start_s)
            return
        self.stats.failures += 1
        if ack.staging_unreadable:
            self._no_shared_memory.add(shipment.kv_address)
        logger.warning("decode refused the KV of %s: %s", ack.request_id, ack.message)

    def cancel(self, request_id: str) -> None:
        """Free whatever a request's transfer holds (its send failed half way)."""
        shipment = self._shipments.get(request_id)
        if shipment is not None:
            self._finish(shipment)
        else:
            self.engine.release_kv(request_id)

    def expire_leases(self) -> None:
        now = time.monotonic()
        for shipment in [s for s in self._shipments.values() if s.lease_deadline < now]:
            self._finish(shipment)
            self.stats.failures += 1
            logger.warning("KV lease of %s expired without an ack; blocks freed", shipment.transfer.request_id)

    @property
    def num_leases(self) -> int:
        return len(self._shipments)

    def close(self) -> None:
        for sockets in self._sockets.values():
            for socket in sockets:
                socket.close(linger=0)

    def _stage(self, request_id: str, header: KVLayers, payload: torch.Tensor) -> _Group:
        """Queue a layer group's copy into its staging region, beside the next steps' compute."""
        with _after_compute(self._copy_stream):
            group = self._gather(request_id, header.layer_start, header.layer_end)
            payload.copy_(group.reshape(-1).view(torch.uint8), non_blocking=self._copy_stream is not None)
            return _Group(header, payload, _copies_done(self._copy_stream), source=group)

    def _send_unstaged(self, shipment: _Shipment, sockets: list[zmq.Socket]) -> None:
        request_id = shipment.transfer.request_id
        for layer_start, layer_end in self._groups():
            group = self._gather(request_id, layer_start, layer_end)
            header = KVLayers(request_id=request_id, layer_start=layer_start, layer_end=layer_end,
                              num_blocks=group.shape[2])
            payload = group.cpu().contiguous().view(torch.uint8)
            self._send_group(sockets, header, payload)
            self.stats.bytes_sent += payload.numel()

    def _gather(self, request_id: str, layer_start: int, layer_end: int) -> torch.Tensor:
        """Layers [layer_start, layer_end) of a held request: [layers, 2, blocks, block_size, heads, head_dim]."""
        return torch.stack([self.engine.export_kv(request_id, layer) for layer in range(layer_start, layer_end)])

    def _send_group(self, sockets: list[zmq.Socket], header: KVLayers, payload: torch.Tensor | None) -> None:
        """A group's header (with its bytes as a frame, unless they wait in shared memory) on the
        connection whose turn it is."""
        socket = sockets[header.layer_start // LAYERS_PER_MESSAGE % len(sockets)]
        if payload is None:
            socket.send_multipart(self._codec.encode(header))
        else:
            socket.send_multipart(self._codec.encode(header, memoryview(payload.numpy()).cast("B")), copy=False)

    def _finish(self, shipment: _Shipment) -> None:
        """Free what a shipment holds: its GPU blocks if still held, its staging region once no copy reads it."""
        del self._shipments[shipment.transfer.request_id]
        for group in shipment.groups:
            if group.copied is not None:
                group.copied.synchronize()
        if shipment.holds_blocks:
            self.engine.release_kv(shipment.transfer.request_id)
        if shipment.region is not None:
            self.staging.allocator.free(shipment.region)

    def _groups(self) -> list[tuple[int, int]]:
        num_layers = self.layout.num_layers
        return [(start, min(start + LAYERS_PER_MESSAGE, num_layers)) for start in range(0, num_layers, LAYERS_PER_MESSAGE)]

    def _layer_bytes(self, num_blocks: int) -> int:
        layout, itemsize = self.layout, self.engine.runner.dtype.itemsize
        return 2 * num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize

    def _socket(self, address: str) -> list[zmq.Socket]:
        """`num_streams` connections to one decode worker: layer groups take turns, so the copies in the
        kernel and in ZeroMQ's I/O threads run side by side."""
        if address not in self._sockets:
            sockets = []
            for _ in range(self.num_streams):
                socket = configure(self._context.socket(zmq.PUSH), MAX_KV_MESSAGE_BYTES)
                socket.connect(address)
                sockets.append(socket)
            self._sockets[address] = sockets
        return self._sockets[address]


@dataclass
class _Import:
    transfer: KVTransfer
    deadline: float
    layers_done: set[int] = field(default_factory=set)
    multi_modal: MultiModalInputs | None = None


@dataclass
class Resume:
    """A request the decode worker must serve by recomputing (its KV did not arrive)."""

    transfer: KVTransfer
    reason: str
    multi_modal: MultiModalInputs | None = None  # a vision-language prompt's images, for the recompute


class KVReceiver:
    """Decode side: reserves blocks, writes arriving layers, acks, and hands back what must be recomputed.

    Layer groups come over several connections, so one may arrive before its request's KVTransfer:
    it waits (bounded by `timeout_s` and MAX_EARLY_BYTES) until the transfer opens. On a GPU the
    copies into the paged cache run on a side stream, beside the decode steps of other requests;
    a request joins the running batch, and its ack leaves, only once its copies are done (the ack
    lets prefill reuse the staging memory those copies read).
    """

    def __init__(self, engine: LLMEngine, context: zmq.Context, socket: zmq.Socket, layout: KVLayout,
                 timeout_s: float = 10.0, stats: TransferStats | None = None, *, pin_staging: bool = False,
                 image_inputs: Callable[[KVTransfer, list], MultiModalInputs | None] | None = None) -> None:
        self.engine = engine
        self.layout = layout
        self.timeout_s = timeout_s
        self.stats = stats or TransferStats()
        self.socket = socket
        self.staging = StagingReader(pin=pin_staging)
        self._image_inputs = image_inputs  # a transfer's image frames -> the engine's inputs
        self._context = context
        self._acks: dict[str, zmq.Socket] = {}
        self._imports: dict[str, _Import] = {}
        self._early: dict[str, list[tuple[KVLayers, list, float]]] = {}  # request id -> (header, frames, deadline)
        self._early_bytes = 0
        self._closed: deque[str] = deque(maxlen=4096)  # requests whose late groups are dropped, not kept
        self._committing: deque[tuple[KVTransfer, "torch.cuda.Event | None"]] = deque()  # written, copies in flight
        self._copy_stream = _side_stream(engine)
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
                resume = self._open(message, frames[1:])
                if resume is not None:
                    resumes.append(resume)
                    continue
                for header, early_frames, _ in self._take_early(message.request_id):
                    outcome = self._write(header, early_frames)
                    if outcome is not None:
                        (completed if isinstance(outcome, KVTransfer) else resumes).append(outcome)
            else:
                outcome = self._write(message, frames[1:])
                if outcome is not None:
                    (completed if isinstance(outcome, KVTransfer) else resumes).append(outcome)
        completed += self._commit_ready()
        return completed, resumes + self._expire()

    def abort(self, request_id: str) -> bool:
        """Drop a transfer in progress and free its blocks (once no copy writes them). False if none."""
        entry = self._imports.pop(request_id, None)
        transfer = entry.transfer if entry is not None else None
        for item in [c for c in self._committing if c[0].request_id == request_id]:
            self._committing.remove(item)
            transfer = item[0]
        if transfer is None:
            return False
        self._closed.append(request_id)
        self._wait_for_copies()
        self.engine.abort_request(request_id)
        self._ack(transfer, accepted=False, message="aborted")
        return True

    @property
    def num_pending(self) -> int:
        return len(self._imports) + len(self._committing) + len(self._early)

    def close(self) -> None:
        for socket in self._acks.values():
            socket.close(linger=0)
        self.staging.close()

    def _open(self, transfer: KVTransfer, frames: list) -> Resume | None:
        if transfer.request_id in self._closed:  # the same id again (a migrated request): a new transfer
            self._closed.remove(transfer.request_id)
        multi_modal = None
        if transfer.images:
            try:
                multi_modal = self._image_inputs(transfer, frames) if self._image_inputs is not None else None
            except (ValueError, InvalidRequestError) as exc:
                self._refuse_early(transfer.request_id)
                self._ack(transfer, accepted=False, message=f"bad image embeddings: {exc}")
                return Resume(transfer, f"bad image embeddings: {exc}")
        if transfer.layout != self.layout:
            self._refuse_early(transfer.request_id)
            self._ack(transfer, accepted=False, message=f"layout {transfer.layout} != {self.layout}")
            return Resume(transfer, f"KV layout mismatch: prefill {transfer.layout}, decode {self.layout}",
                          multi_modal)
        from services.workers.engine_worker import sampling_params  # the one mapping of the wire form

        block_ids = self.engine.import_request(transfer.request_id, transfer.prompt_token_ids,
                                               transfer.output_token_ids, sampling_params(transfer.sampling),
                                               cache_salt=transfer.cache_salt, multi_modal=multi_modal)
        if block_ids is None:
            self._refuse_early(transfer.request_id)
            self._ack(transfer, accepted=False, message="no KV room on the decode worker")
            return Resume(transfer, "no KV room", multi_modal)
        self._imports[transfer.request_id] = _Import(transfer, time.monotonic() + self.timeout_s,
                                                     multi_modal=multi_modal)
        return None

    def _write(self, header: KVLayers, frames: list) -> KVTransfer | Resume | None:
        """Write one layer group. Returns the transfer once complete, a Resume if it must be recomputed."""
        entry = self._imports.get(header.request_id)
        if entry is None:
            if header.request_id not in self._closed:  # its KVTransfer is still on another connection
                self._keep_early(header, frames)
            return None
        layout = self.layout
        try:
            if header.staging is not None:
                data = self.staging.view(header.staging.name, header.staging.offset, header.staging.nbytes)
            else:
                data = torch.frombuffer(frames[0].buffer, dtype=torch.uint8)
        except ValueError as exc:
            return self._fail(entry, f"staging unreadable: {exc}", staging_unreadable=True)
        shape = (header.layer_end - header.layer_start, 2, header.num_blocks, layout.block_size,
                 layout.num_kv_heads, layout.head_dim)
        group = data.view(self.engine.runner.dtype).reshape(shape)
        with _after_compute(self._copy_stream):
            for offset, layer in enumerate(range(header.layer_start, header.layer_end)):
                self.engine.import_kv(header.request_id, layer, group[offset])
                entry.layers_done.add(layer)
        self.stats.bytes_received += data.numel()
        if len(entry.layers_done) < layout.num_layers:
            return None
        del self._imports[header.request_id]
        self._closed.append(header.request_id)
        self._committing.append((entry.transfer, _copies_done(self._copy_stream)))
        return None

    def _wait_for_copies(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def _commit_ready(self) -> list[KVTransfer]:
        """Requests whose copies are done start decoding, and their acks leave (in arrival order)."""
        committed = []
        while self._committing and (self._committing[0][1] is None or self._committing[0][1].query()):
            transfer, _ = self._committing.popleft()
            self.engine.commit_import(transfer.request_id)
            self._ack(transfer, accepted=True)
            committed.append(transfer)
        return committed

    def _fail(self, entry: _Import, reason: str, staging_unreadable: bool = False) -> Resume:
        request_id = entry.transfer.request_id
        del self._imports[request_id]
        self._closed.append(request_id)
        self._wait_for_copies()  # earlier groups may still be on their way into the blocks
        self.engine.abort_request(request_id)  # frees the reserved blocks
        self._ack(entry.transfer, accepted=False, message=reason, staging_unreadable=staging_unreadable)
        return Resume(entry.transfer, reason, entry.multi_modal)

    def _keep_early(self, header: KVLayers, frames: list) -> None:
        nbytes = sum(len(f.buffer) for f in frames)
        if self._early_bytes + nbytes > MAX_EARLY_BYTES:
            logger.warning("dropped an early KV group of %s: %d bytes already wait", header.request_id,
                           self._early_bytes)
            return
        self._early_bytes += nbytes
        self._early.setdefault(header.request_id, []).append((header, frames, time.monotonic() + self.timeout_s))

    def _take_early(self, request_id: str) -> list[tuple[KVLayers, list, float]]:
        groups = self._early.pop(request_id, [])
        self._early_bytes -= sum(len(f.buffer) for _, frames, _ in groups for f in frames)
        return groups

    def _refuse_early(self, request_id: str) -> None:
        self._take_early(request_id)
        self._closed.append(request_id)

    def _expire(self) -> list[Resume]:
        now = time.monotonic()
        for request_id in [r for r, groups in self._early.items() if groups[0][2] < now]:
            self._take_early(request_id)  # its transfer never opened here
        return [self._fail(entry, "transfer timed out")
                for entry in [e for e in self._imports.values() if e.deadline < now]]

    def _ack(self, transfer: KVTransfer, accepted: bool, message: str = "", staging_unreadable: bool = False) -> None:
        if not accepted:
            self.stats.failures += 1
        socket = self._acks.get(transfer.ack_to)
        if socket is None:
            socket = configure(self._context.socket(zmq.PUSH))
            socket.connect(transfer.ack_to)
            self._acks[transfer.ack_to] = socket
        ack = KVAck(request_id=transfer.request_id, accepted=accepted, message=message,
                    staging_unreadable=staging_unreadable)
        socket.send_multipart(self._ack_codec.encode(ack))


# ----------------------------------------------------------------------------------------------
# The side stream both ends copy on (None on the CPU, where copies are synchronous)


def _side_stream(engine: LLMEngine) -> torch.cuda.Stream | None:
    device = engine.runner.device
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _after_compute(stream: torch.cuda.Stream | None):
    """Run on `stream` after whatever the compute stream already queued: the KV a prefill step wrote,
    or the reads of blocks a decode step may still be running over the blocks a copy overwrites."""
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)


def _copies_done(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event for the copies queued so far on `stream` (None: they are done already)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event
