"""The prefill end of a KV transfer (protocol and tunables: services.workers.kv_transfer).

A held request's KV leaves layer group by layer group: copied into shared-memory staging on a side
stream beside the next steps' compute, each group sent once its copy is done, the GPU blocks freed
as soon as everything is staged, and the staging region freed on the decode worker's ack or when
the request's lease runs out.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq

from services.common.channels import configure, connect
from services.common.codec import MessageCodec
from services.common.messages import KVAck, KVInbound, KVLayers, KVLayout, KVTarget, KVTransfer, StagingRef
from services.common.security import CurveKeys
from services.engine import LLMEngine
from services.workers.kv_staging import StagingBuffer
from services.workers.kv_transfer import (
    KV_STREAMS,
    LAYERS_PER_MESSAGE,
    TransferStats,
    after_compute,
    copies_done,
    side_stream,
)

logger = logging.getLogger(__name__)


@dataclass
class _Group:
    """One staged layer group: its header, and the copy that must finish before the header leaves."""

    header: KVLayers
    payload: torch.Tensor  # uint8 view of the staging region (sent as a frame unless the header references it)
    copied: torch.cuda.Event | None  # None: the copy already finished (CPU)
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
    GPU blocks as soon as all of its groups are staged. A request that finds the staging buffer full
    waits, its KV held on the GPU, until acks free room (FIFO: `poll` starts the waiting ones in
    order); only one larger than the whole buffer, or any with staging off, goes out the plain way:
    copied to the host and sent inside `send`, at a fraction of the staged path's rate (a synchronous
    copy to pageable memory, then ZeroMQ frames), so that path is kept for requests nothing else takes.

    It connects to the `kv_address` of each target it is given: its owner checks that address against
    the worker's PeerRegistry first (EngineWorker, when the request arrives). `keys`: the cluster's
    CURVE keys (decode workers' KV sockets are CURVE servers then).
    """

    def __init__(
        self,
        engine: LLMEngine,
        context: zmq.Context,
        layout: KVLayout,
        ack_to: str,
        lease_s: float = 30.0,
        stats: TransferStats | None = None,
        *,
        staging: StagingBuffer | None = None,
        host_id: str = "",
        num_streams: int = KV_STREAMS,
        keys: CurveKeys | None = None,
    ) -> None:
        self.engine = engine
        self.layout = layout
        self.ack_to = ack_to
        self.lease_s = lease_s
        self.stats = stats or TransferStats()
        self.staging = staging
        self.host_id = host_id
        self.num_streams = num_streams
        self._keys = keys
        self._context = context
        self._sockets: dict[str, list[zmq.Socket]] = {}
        self._shipments: dict[str, _Shipment] = {}
        self._no_shared_memory: set[str] = set()  # decode workers that could not read our staging file
        # transfers waiting for staging room, oldest first (their KV held on the GPU meanwhile)
        self._waiting: deque[tuple[KVTransfer, KVTarget, Sequence[memoryview]]] = deque()
        self._codec = MessageCodec(KVInbound)
        self._copy_stream = side_stream(engine)

    def send(self, transfer: KVTransfer, target: KVTarget, embeddings: Sequence[memoryview] = ()) -> None:
        """Open the transfer (with a vision-language prompt's image `embeddings` as frames) and ship the KV,
        or queue it until the staging buffer has room for it."""
        if self._waiting or not self._start(transfer, target, embeddings):
            self._waiting.append((transfer, target, embeddings))
            self.stats.staging_waits += 1

    def _start(self, transfer: KVTransfer, target: KVTarget, embeddings: Sequence[memoryview]) -> bool:
        """Ship a transfer; False, sending nothing, when it fits the staging buffer but not its free room now."""
        request_id = transfer.request_id
        num_blocks = len(self.engine.kv_cache.block_ids(request_id))
        layer_bytes = self._layer_bytes(num_blocks)
        nbytes = layer_bytes * self.layout.num_layers
        region = self.staging.allocator.allocate(nbytes) if self.staging else None
        if region is None and self.staging is not None and self.staging.allocator.fits(nbytes):
            return False
        sockets = self._socket(target.kv_address)
        sockets[0].send_multipart(self._codec.encode(transfer, *embeddings))
        shipment = _Shipment(
            transfer,
            target.kv_address,
            time.perf_counter(),
            time.monotonic() + self.lease_s,
            holds_blocks=True,
            region=region,
        )
        self._shipments[request_id] = shipment
        if region is None:
            self._send_unstaged(shipment, sockets)
            return True
        assert self.staging is not None  # the region was allocated from it
        shared = (
            target.host_id == self.host_id and bool(self.host_id) and target.kv_address not in self._no_shared_memory
        )
        for layer_start, layer_end in self._groups():
            offset = region + layer_start * layer_bytes
            nbytes = (layer_end - layer_start) * layer_bytes
            ref = StagingRef(name=self.staging.name, offset=offset, nbytes=nbytes) if shared else None
            header = KVLayers(
                request_id=request_id, layer_start=layer_start, layer_end=layer_end, num_blocks=num_blocks, staging=ref
            )
            shipment.groups.append(self._stage(request_id, header, self.staging.view(offset, nbytes)))
        self._send_ready()
        return True

    def poll(self) -> None:
        """Start the waiting transfers that fit now, in order; send every staged group whose copy is done
        (in order per request); free staged GPU blocks."""
        while self._waiting and self._start(*self._waiting[0]):
            self._waiting.popleft()
        self._send_ready()

    def _send_ready(self) -> None:
        for shipment in self._shipments.values():
            sockets = self._sockets[shipment.kv_address]
            while shipment.groups and shipment.groups[0].ready():
                group = shipment.groups.popleft()
                self._send_group(sockets, group.header, None if group.header.staging else group.payload)
                self.stats.bytes_sent += group.payload.numel()
                if group.header.staging is not None:
                    self.stats.bytes_sent_shared_memory += group.payload.numel()
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
            return
        self._waiting = deque(w for w in self._waiting if w[0].request_id != request_id)
        self.engine.release_kv(request_id)

    def expire_leases(self) -> None:
        now = time.monotonic()
        for shipment in [s for s in self._shipments.values() if s.lease_deadline < now]:
            self._finish(shipment)
            self.stats.failures += 1
            logger.warning("KV lease of %s expired without an ack; blocks freed", shipment.transfer.request_id)

    @property
    def num_leases(self) -> int:
        """Transfers under way or waiting for staging room."""
        return len(self._shipments) + len(self._waiting)

    def close(self) -> None:
        for sockets in self._sockets.values():
            for socket in sockets:
                socket.close(linger=0)

    def _stage(self, request_id: str, header: KVLayers, payload: torch.Tensor) -> _Group:
        """Queue a layer group's copy into its staging region, beside the next steps' compute."""
        with after_compute(self._copy_stream):
            group = self._gather(request_id, header.layer_start, header.layer_end)
            payload.copy_(group.reshape(-1).view(torch.uint8), non_blocking=self._copy_stream is not None)
            return _Group(header, payload, copies_done(self._copy_stream), source=group)

    def _send_unstaged(self, shipment: _Shipment, sockets: list[zmq.Socket]) -> None:
        request_id = shipment.transfer.request_id
        for layer_start, layer_end in self._groups():
            group = self._gather(request_id, layer_start, layer_end)
            header = KVLayers(
                request_id=request_id, layer_start=layer_start, layer_end=layer_end, num_blocks=group.shape[2]
            )
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
            socket.send_multipart(self._codec.encode(header, payload.numpy().data.cast("B")), copy=False)

    def _finish(self, shipment: _Shipment) -> None:
        """Free what a shipment holds: its GPU blocks if still held, its staging region once no copy reads it."""
        del self._shipments[shipment.transfer.request_id]
        for group in shipment.groups:
            if group.copied is not None:
                group.copied.synchronize()
        if shipment.holds_blocks:
            self.engine.release_kv(shipment.transfer.request_id)
        if shipment.region is not None:
            assert self.staging is not None  # the region was allocated from it
            self.staging.allocator.free(shipment.region)

    def _groups(self) -> list[tuple[int, int]]:
        num_layers = self.layout.num_layers
        return [
            (start, min(start + LAYERS_PER_MESSAGE, num_layers)) for start in range(0, num_layers, LAYERS_PER_MESSAGE)
        ]

    def _layer_bytes(self, num_blocks: int) -> int:
        layout, itemsize = self.layout, self.engine.runner.dtype.itemsize
        return 2 * num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize

    def _socket(self, address: str) -> list[zmq.Socket]:
        """`num_streams` connections to one decode worker: layer groups take turns, so the copies in the
        kernel and in ZeroMQ's I/O threads run side by side."""
        if address not in self._sockets:
            sockets = []
            for _ in range(self.num_streams):
                # a PUSH socket receives nothing: its inbound limit is moot (the decode side's is the one)
                sockets.append(connect(configure(self._context.socket(zmq.PUSH)), address, self._keys))
            self._sockets[address] = sockets
        return self._sockets[address]
