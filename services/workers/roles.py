"""The two disaggregated roles of an engine worker, each a small manager the worker loop composes.

    PrefillRole  a request that names a `kv_target` (n == 1, more than one token) is computed to its
                 first token; the engine hands it off (FINISHED_HANDOFF) and this role ships its KV
                 (KVSender: staging, leases, acks) and its images to the decode worker
    DecodeRole   receives KV (KVReceiver) on its own socket: a complete transfer starts decoding from
                 the second token; a refused, malformed or late one is recomputed here (`resumes`)

A colocated worker has neither. Requests without a target (n > 1, max_tokens == 1, a migrated or
fallback request) are served whole on whichever worker gets them: every worker runs a whole engine.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from services.common.channels import bind, configure
from services.common.codec import DecodeError
from services.common.messages import GenerateRequest, KVAck, KVLayout, KVTransfer
from services.common.security import CurveKeys
from services.engine import LLMEngine
from services.engine.multimodal import MultiModalInputs
from services.engine.outputs import Handoff
from services.workers.kv_receiver import KVReceiver
from services.workers.kv_sender import KVSender
from services.workers.kv_staging import StagingBuffer
from services.workers.kv_transfer import TransferStats, max_kv_frame_bytes
from services.workers.peers import PeerRegistry
from services.workers.request_table import RequestRecord
from services.workers.wire import embedding_frame

logger = logging.getLogger(__name__)

# a prefill worker's shared-memory staging buffer for outgoing KV, by device (the CPU engine's KV is small)
# (on a GPU, room for several long prompts in flight: a 1,200-token LLaVA-1.5-7B prompt's KV is 629 MiB,
# and a transfer that finds the buffer full waits for an ack to free room)
DEFAULT_KV_STAGING_BYTES = {"cuda": 4 * 2**30, "cpu": 64 * 2**20}


class PrefillRole:
    """Owns the KV sender, its staging buffer and the leases on what shipped KV still holds."""

    def __init__(
        self,
        engine: LLMEngine,
        context: zmq.Context,
        layout: KVLayout,
        ack_to: str,
        host_id: str,
        stats: TransferStats,
        *,
        lease_s: float,
        staging_bytes: int | None,
        keys: CurveKeys | None = None,
    ) -> None:
        cuda = engine.runner.device.type == "cuda"
        if staging_bytes is None:
            staging_bytes = DEFAULT_KV_STAGING_BYTES["cuda" if cuda else "cpu"]
        self.staging = open_staging(staging_bytes, pin=cuda)
        self.stats = stats
        self._ack_to = ack_to
        self.sender = KVSender(
            engine, context, layout, ack_to, lease_s, stats, staging=self.staging, host_id=host_id, keys=keys
        )

    @staticmethod
    def hands_off(message: GenerateRequest) -> bool:
        """Whether this worker computes only the prompt and first token of `message`."""
        sampling = message.sampling
        return message.kv_target is not None and sampling.n == 1 and sampling.max_tokens != 1

    @property
    def num_pending(self) -> int:
        """Shipments still holding blocks or staging (the loop keeps turning while any is open)."""
        return self.sender.num_leases

    def ship(self, handoff: Handoff, record: RequestRecord) -> None:
        """Open the transfer of a handed-off request's KV (and its images' embeddings) to its decode worker."""
        message = record.message
        assert message.kv_target is not None
        transfer = KVTransfer(
            request=message.resume_after(handoff.output_token_ids), layout=self.sender.layout, ack_to=self._ack_to
        )
        # the images go along: the decode worker keys its blocks by them and recomputes with them
        features = record.multi_modal.features if record.multi_modal is not None else ()
        embeddings = [embedding_frame(f.embeddings)[1] for f in features]
        try:
            self.sender.send(transfer, message.kv_target, embeddings)
        except Exception:  # the decode worker will time out and recompute; free our blocks now
            logger.error("could not send the KV of %s: %s", message.request_id, traceback.format_exc())
            self.stats.failures += 1
            self.sender.cancel(message.request_id)

    def on_ack(self, ack: KVAck) -> None:
        self.sender.on_ack(ack)

    def poll(self) -> None:
        """Send staged layer groups whose copies are done; free what expired leases hold."""
        self.sender.poll()
        self.sender.expire_leases()

    def close(self) -> None:
        self.sender.close()
        if self.staging is not None:
            self.staging.close()


@dataclass
class Resumed:
    """A request a decode worker goes on with: its KV is in (`kv_imported`), or it recomputes it."""

    request: GenerateRequest
    kv_imported: bool
    multi_modal: MultiModalInputs | None = None
    kv_transfer_s: float | None = None  # imported: KVTransfer received -> KV in place, on this worker's clock


class DecodeRole:
    """Owns the KV socket and receiver; turns arrived transfers into requests to decode or recompute."""

    def __init__(
        self,
        engine: LLMEngine,
        context: zmq.Context,
        layout: KVLayout,
        bind_address: str,
        stats: TransferStats,
        *,
        timeout_s: float,
        image_inputs: Callable[[KVTransfer, list], MultiModalInputs | None],
        peers: PeerRegistry,
        keys: CurveKeys | None = None,
    ) -> None:
        """`peers`: where acks and tokens may go; `keys`: the cluster's CURVE keys (the KV socket is a
        CURVE server, the ack sockets clients), None: plain sockets."""
        self.stats = stats
        # prefill workers of the same model send nothing larger than max_kv_frame_bytes (see there)
        self.socket = configure(context.socket(zmq.PULL), max_kv_frame_bytes(engine))
        self.address = bind(self.socket, bind_address, keys)
        cuda = engine.runner.device.type == "cuda"
        self.receiver = KVReceiver(
            engine,
            context,
            self.socket,
            layout,
            timeout_s,
            stats,
            pin_staging=cuda,
            image_inputs=image_inputs,
            peers=peers,
            keys=keys,
        )

    @property
    def num_pending(self) -> int:
        return self.receiver.num_pending

    def receive(self) -> list[Resumed]:
        """Drain the KV socket: transfers now complete (decoding from here), and those to recompute."""
        try:
            completed, resumes = self.receiver.receive()
        except DecodeError as exc:
            logger.warning("dropped a malformed KV message: %s", exc)
            return []
        resumed = [
            Resumed(transfer.request, True, kv_transfer_s=self.receiver.take_transfer_seconds(transfer.request_id))
            for transfer in completed
        ]
        for resume in resumes:  # recompute here: the stream continues after the tokens already sent
            self.stats.fallbacks += 1
            logger.warning("recomputing %s: %s", resume.transfer.request_id, resume.reason)
            resumed.append(Resumed(resume.transfer.request, False, resume.multi_modal))
        return resumed

    def abort(self, request_id: str) -> None:
        """Drop a transfer in progress (it waits for copies still writing the request's blocks)."""
        self.receiver.abort(request_id)

    def close(self) -> None:
        self.receiver.close()
        self.socket.close(linger=0)


def open_staging(capacity_bytes: int, pin: bool) -> StagingBuffer | None:
    """The prefill staging buffer, or None (KV then goes the plain way) when it is off or cannot be had."""
    if capacity_bytes <= 0:
        return None
    try:
        return StagingBuffer(capacity_bytes, pin=pin)
    except OSError as exc:  # e.g. a container's small /dev/shm
        logger.warning("no KV staging buffer of %d bytes (%s); KV goes through plain host copies", capacity_bytes, exc)
        return None
