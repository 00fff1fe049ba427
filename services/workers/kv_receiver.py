"""The decode end of a KV transfer (protocol and tunables: services.workers.kv_transfer).

It reserves blocks when a transfer opens, writes each arriving layer group into its own paged
cache (on a side stream), starts the request once every layer's copy is done and acks; a transfer
that is refused, malformed or late becomes a Resume: the request is recomputed here instead.

A transfer names two addresses this side connects to: its `ack_to` (the prefill worker's input) and
its request's `reply_to` (the gateway that streams it). Both must be in the worker's PeerRegistry
(services.workers.peers): a transfer naming any other is dropped whole (no blocks reserved, no ack,
no connection), and its layer groups with it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import zmq

from services.common.channels import configure, connect
from services.common.codec import MessageCodec
from services.common.errors import InvalidRequestError
from services.common.messages import KVAck, KVInbound, KVLayers, KVLayout, KVTransfer, WorkerInbound
from services.common.security import CurveKeys
from services.engine import LLMEngine
from services.engine.multimodal import MultiModalInputs
from services.workers.kv_staging import StagingReader
from services.workers.kv_transfer import MAX_EARLY_BYTES, TransferStats, after_compute, copies_done, side_stream
from services.workers.peers import PeerRegistry
from services.workers.wire import sampling_params

logger = logging.getLogger(__name__)


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

    def __init__(
        self,
        engine: LLMEngine,
        context: zmq.Context,
        socket: zmq.Socket,
        layout: KVLayout,
        timeout_s: float = 10.0,
        stats: TransferStats | None = None,
        *,
        pin_staging: bool = False,
        image_inputs: Callable[[KVTransfer, list], MultiModalInputs | None] | None = None,
        peers: PeerRegistry | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        """`peers`: the addresses acks and tokens may go to (None: the caller vouches for every transfer's
        addresses, as a test wiring both ends by hand does; a worker always passes its registry);
        `keys`: the cluster's CURVE keys for the ack sockets (None: plain)."""
        self.engine = engine
        self.layout = layout
        self.timeout_s = timeout_s
        self.stats = stats or TransferStats()
        self.socket = socket
        self.staging = StagingReader(pin=pin_staging)
        self._image_inputs = image_inputs  # a transfer's image frames -> the engine's inputs
        self._peers = peers
        self._keys = keys
        self._context = context
        self._acks: dict[str, zmq.Socket] = {}
        self._imports: dict[str, _Import] = {}
        self._early: dict[str, list[tuple[KVLayers, list, float]]] = {}  # request id -> (header, frames, deadline)
        self._early_bytes = 0
        self._closed: deque[str] = deque(maxlen=4096)  # requests whose late groups are dropped, not kept
        self._committing: deque[tuple[KVTransfer, torch.cuda.Event | None]] = deque()  # written, copies in flight
        # request id -> when its KVTransfer opened (until committed or dropped), then -> its transfer's seconds
        # (opened -> committed) until take_transfer_seconds
        self._opened_s: dict[str, float] = {}
        self._transfer_s: dict[str, float] = {}
        self._copy_stream = side_stream(engine)
        self._codec = MessageCodec(KVInbound)
        self._ack_codec = MessageCodec(WorkerInbound)

    def receive(self) -> tuple[list[KVTransfer], list[Resume]]:
        """Drain the KV socket. Returns (transfers now complete, requests to recompute)."""
        completed: list[KVTransfer] = []
        resumes: list[Resume] = []
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = self._codec.decode(frames)
            if isinstance(message, KVTransfer):
                if not self._addresses_registered(message):
                    self._refuse_early(message.request_id)  # its groups are dropped too, now and later
                    continue
                resume = self._open(message, frames[1:])
                if resume is not None:
                    resumes.append(resume)
                    continue
                for header, early_frames, _ in self._take_early(message.request_id):
                    outcome = self._write(header, early_frames)
                    if isinstance(outcome, KVTransfer):
                        completed.append(outcome)
                    elif outcome is not None:
                        resumes.append(outcome)
            else:
                outcome = self._write(message, frames[1:])
                if isinstance(outcome, KVTransfer):
                    completed.append(outcome)
                elif outcome is not None:
                    resumes.append(outcome)
        completed += self._commit_ready()
        return completed, resumes + self._expire()

    def abort(self, request_id: str) -> bool:
        """Drop a transfer in progress and free its blocks (once no copy writes them). False if none."""
        entry = self._imports.pop(request_id, None)
        transfer = entry.transfer if entry is not None else None
        for item in [c for c in self._committing if c[0].request_id == request_id]:
            self._committing.remove(item)
            transfer = item[0]
        self._opened_s.pop(request_id, None)
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

    def _addresses_registered(self, transfer: KVTransfer) -> bool:
        """Whether the ack and the tokens of `transfer` may go where it says (each refusal is counted)."""
        if self._peers is None:
            return True
        request_id = transfer.request_id
        return self._peers.allows("ack", transfer.ack_to, request_id) and self._peers.allows(
            "reply", transfer.request.reply_to, request_id
        )

    def _open(self, transfer: KVTransfer, frames: list) -> Resume | None:
        if transfer.request_id in self._closed:  # the same id again (a migrated request): a new transfer
            self._closed.remove(transfer.request_id)
        multi_modal = None
        if transfer.request.images:
            try:
                multi_modal = self._image_inputs(transfer, frames) if self._image_inputs is not None else None
            except (ValueError, InvalidRequestError) as exc:
                self._refuse_early(transfer.request_id)
                self._ack(transfer, accepted=False, message=f"bad image embeddings: {exc}")
                return Resume(transfer, f"bad image embeddings: {exc}")
        if transfer.layout != self.layout:
            self._refuse_early(transfer.request_id)
            self._ack(transfer, accepted=False, message=f"layout {transfer.layout} != {self.layout}")
            return Resume(transfer, f"KV layout mismatch: prefill {transfer.layout}, decode {self.layout}", multi_modal)
        request = transfer.request
        block_ids = self.engine.import_request(
            request.request_id,
            request.prompt_token_ids,
            request.output_token_ids,
            sampling_params(request.sampling),
            cache_salt=request.cache_salt,
            multi_modal=multi_modal,
        )
        if block_ids is None:
            self._refuse_early(transfer.request_id)
            self._ack(transfer, accepted=False, message="no KV room on the decode worker")
            return Resume(transfer, "no KV room", multi_modal)
        self._imports[transfer.request_id] = _Import(
            transfer, time.monotonic() + self.timeout_s, multi_modal=multi_modal
        )
        self._opened_s[transfer.request_id] = time.monotonic()
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
        shape = (
            header.layer_end - header.layer_start,
            2,
            header.num_blocks,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        group = data.view(self.engine.runner.dtype).reshape(shape)
        with after_compute(self._copy_stream):
            for offset, layer in enumerate(range(header.layer_start, header.layer_end)):
                self.engine.import_kv(header.request_id, layer, group[offset])
                entry.layers_done.add(layer)
        self.stats.bytes_received += data.numel()
        if header.staging is not None:
            self.stats.bytes_received_shared_memory += data.numel()
        if len(entry.layers_done) < layout.num_layers:
            return None
        del self._imports[header.request_id]
        self._closed.append(header.request_id)
        self._committing.append((entry.transfer, copies_done(self._copy_stream)))
        return None

    def _wait_for_copies(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def _commit_ready(self) -> list[KVTransfer]:
        """Requests whose copies are done start decoding, and their acks leave (in arrival order)."""
        committed = []
        while self._committing and (self._committing[0][1] is None or self._committing[0][1].query()):
            transfer, _ = self._committing.popleft()
            opened_s = self._opened_s.pop(transfer.request_id, None)
            if opened_s is not None:
                self._transfer_s[transfer.request_id] = time.monotonic() - opened_s
            self.engine.commit_import(transfer.request_id)
            self._ack(transfer, accepted=True)
            committed.append(transfer)
        return committed

    def take_transfer_seconds(self, request_id: str) -> float | None:
        """A committed transfer's seconds on this worker's clock, KVTransfer received -> KV in place (once)."""
        return self._transfer_s.pop(request_id, None)

    def _fail(self, entry: _Import, reason: str, staging_unreadable: bool = False) -> Resume:
        request_id = entry.transfer.request_id
        self._opened_s.pop(request_id, None)
        del self._imports[request_id]
        self._closed.append(request_id)
        self._wait_for_copies()  # earlier groups may still be on their way into the blocks
        self.engine.abort_request(request_id)  # frees the reserved blocks
        self._ack(entry.transfer, accepted=False, message=reason, staging_unreadable=staging_unreadable)
        return Resume(entry.transfer, reason, entry.multi_modal)

    def _keep_early(self, header: KVLayers, frames: list) -> None:
        nbytes = sum(len(f.buffer) for f in frames)
        if self._early_bytes + nbytes > MAX_EARLY_BYTES:
            logger.warning(
                "dropped an early KV group of %s: %d bytes already wait", header.request_id, self._early_bytes
            )
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
        return [
            self._fail(entry, "transfer timed out") for entry in [e for e in self._imports.values() if e.deadline < now]
        ]

    def _ack(self, transfer: KVTransfer, accepted: bool, message: str = "", staging_unreadable: bool = False) -> None:
        if not accepted:
            self.stats.failures += 1
        socket = self._acks.get(transfer.ack_to)
        if socket is None:  # ack_to passed _addresses_registered when the transfer opened
            socket = connect(configure(self._context.socket(zmq.PUSH)), transfer.ack_to, self._keys)
            self._acks[transfer.ack_to] = socket
        ack = KVAck(
            request_id=transfer.request_id, accepted=accepted, message=message, staging_unreadable=staging_unreadable
        )
        socket.send_multipart(self._ack_codec.encode(ack))
