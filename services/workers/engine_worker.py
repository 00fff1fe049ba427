"""A worker's heartbeat: receive over ZeroMQ, step the engine, send token deltas, ship handed-off KV.

    loop:  receive (block only when idle)  requests, aborts, acks, KV, image embeddings
           start                           requests whose images or KV are in
           step                            engine.step(): deltas, and handoffs (prefill)
           send                            one OutputBatch per gateway (first tokens before their KV)
           ship                            handed-off KV to the decode worker (prefill)
           tick                            staged KV out, expired leases freed, KV events logged

The worker composes small managers, each owning its own state (one record per request in the
RequestTable; everything else keyed by request id and told when a request leaves):

    RequestTable, ReplySender   services.workers.request_table   who asked, where its tokens go
    ImageIntake                 services.workers.image_intake    embeddings in, requests parked for them
    PrefillRole | DecodeRole    services.workers.roles           KV out (sender, staging, leases) / KV in
    KVEventLog                  services.workers.event_log       the prefix cache's events, for routers
    PeerRegistry                services.workers.peers           the addresses it may connect to

A colocated worker serves prompt and every token; a prefill worker hands a request that names a
`kv_target` off after its first token; a decode worker also takes KV on its own socket. The loop
owns the engine; nothing else touches it. Control-plane calls (stats, health) come from other
threads and only read counters.

Trust: the worker connects only to addresses a gateway registered over Ray (`peers`): a request
whose reply_to (or, handed off, whose KV target) is not registered is dropped before it is admitted.
With the cluster's CURVE `keys`, every socket it binds is a CURVE server vetted by this context's ZAP
handler, and every socket it connects is a CURVE client (services.common.security).

Failure policy: a request the engine refuses gets a RequestError (400 with the parameter named);
an unexpected error inside a step fails every request in flight with a 500-class error and frees
their blocks, and the loop goes on serving new requests.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable

import zmq

from services.common.channels import bind, configure, drain
from services.common.codec import MessageCodec
from services.common.control import WorkerStats
from services.common.errors import InvalidRequestError
from services.common.messages import AbortRequest, EncodeRequest, GenerateRequest, KVAck, RequestError, WorkerInbound
from services.common.security import CurveKeys, start_authenticator
from services.engine import LLMEngine
from services.engine.multimodal import MultiModalInputs
from services.engine.outputs import Handoff
from services.workers.event_log import KVEventLog
from services.workers.image_intake import ImageIntake
from services.workers.kv_staging import host_identity
from services.workers.kv_transfer import KV_STREAMS, TransferStats, engine_layout
from services.workers.peers import PeerRegistry
from services.workers.request_table import Reply, ReplySender, RequestRecord, RequestTable
from services.workers.roles import DecodeRole, PrefillRole, Resumed
from services.workers.state_publisher import StatePublisher
from services.workers.wire import sampling_params, to_delta

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50  # how long an idle loop waits for a request before checking for shutdown
ROLES = ("colocated", "prefill", "decode")


class EngineWorker:
    def __init__(
        self,
        engine: LLMEngine,
        input_address: str,
        name: str = "worker-0",
        *,
        role: str = "colocated",
        kv_address: str | None = None,
        embedding_address: str | None = None,
        model_name: str = "model",
        kv_lease_s: float = 30.0,
        kv_timeout_s: float = 10.0,
        kv_staging_bytes: int | None = None,
        image_encoder=None,
        max_ready_image_tokens: int | None = None,
        worker_stats: Callable[[], WorkerStats] | None = None,
        keys: CurveKeys | None = None,
        peers: PeerRegistry | None = None,
    ) -> None:
        """`keys`: the cluster's CURVE keys (None: plain sockets); `peers`: the addresses it may connect
        to, filled by gateways over Ray (None: a registry of its own, empty until registered);
        `kv_address`, `embedding_address`: where a decode worker binds its KV socket, and every worker its
        embedding socket (None: the input address's host, any port): a decode worker computes whole the
        image requests it is given (n > 1, or with the prefill pool down), so it takes embeddings too;
        `max_ready_image_tokens`: the image prompts handed to the engine and not yet started past which
        it takes no more embeddings (ImageIntake's max_ready_tokens; None: its default)."""
        if role not in ROLES:
            raise ValueError(f"unknown worker role {role!r}; choose one of {ROLES}")
        self.engine = engine
        self.name = name
        self.host_id = host_identity()
        self.peers = peers if peers is not None else PeerRegistry(name)
        self._context = zmq.Context(io_threads=KV_STREAMS if role != "colocated" else 1)
        self._authenticator = start_authenticator(self._context, keys, name)  # before any socket binds
        # GenerateRequests (a prompt of up to max_model_len ids and the request's strings), aborts, acks
        # and a colocated worker's EncodeRequests (image bytes): the codec's header limit covers them all
        self._input = configure(self._context.socket(zmq.PULL))
        self.input_address = bind(self._input, input_address, keys)
        any_port = self.input_address.rsplit(":", 1)[0] + ":0"  # more sockets on the same host
        self.transfer_stats = TransferStats()
        self.requests = RequestTable()
        self._replies = ReplySender(self._context, name, keys)
        self.images = ImageIntake(
            engine,
            self._context,
            embedding_address or any_port,
            name,
            image_encoder,
            keys=keys,
            max_ready_tokens=max_ready_image_tokens,
        )
        layout = engine_layout(engine, model_name)
        self.prefill_role = (
            PrefillRole(
                engine,
                self._context,
                layout,
                self.input_address,
                self.host_id,
                self.transfer_stats,
                lease_s=kv_lease_s,
                staging_bytes=kv_staging_bytes,
                keys=keys,
            )
            if role == "prefill"
            else None
        )
        self.decode_role = (
            DecodeRole(
                engine,
                self._context,
                layout,
                kv_address or any_port,
                self.transfer_stats,
                timeout_s=kv_timeout_s,
                image_inputs=self.images.transfer_inputs,
                peers=self.peers,
                keys=keys,
            )
            if role == "decode"
            else None
        )
        self.kv_address = self.decode_role.address if self.decode_role is not None else None
        self.embedding_address = self.images.address
        kv_cache = engine.kv_cache
        self.kv_events = KVEventLog(kv_cache.pool.cached_hashes, host_snapshot=kv_cache.host_cached_hashes)
        # the state socket: KV events, `worker_stats` and admitted requests as they happen (None: no socket)
        self.publisher = (
            StatePublisher(
                self._context,
                any_port,
                name,
                self.kv_events,
                worker_stats,
                block_size=engine.kv_cache.block_size,
                keys=keys,
            )
            if worker_stats is not None
            else None
        )
        self._poller = zmq.Poller()
        for socket in (self._input, self.images.socket, self.decode_role.socket if self.decode_role else None):
            if socket is not None:
                self._poller.register(socket, zmq.POLLIN)
        self._inbound = MessageCodec(WorkerInbound)
        self._stop = threading.Event()
        self.num_steps = 0

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        logger.info("%s serving on %s", self.name, self.input_address)
        # Everything built so far (the model, tokenizer, graphs, managers) lives as long as the worker:
        # moved out of the collector's generations, a collection no longer walks it, so the pauses the
        # loop's short-lived objects trigger stay short (vLLM and SGLang do the same after warm-up).
        gc.collect()
        gc.freeze()
        while not self._stop.is_set():
            replies = self._receive(block=not self._busy())
            replies += self._start_ready()
            handoffs: list[Handoff] = []
            if self.engine.has_unfinished_requests():
                replies += self._step(handoffs)
            self._replies.send(replies, self.requests)  # first tokens leave before their KV
            self._ship(handoffs)
            self._tick()
        self._close()

    def stop(self) -> None:
        self._stop.set()

    def _busy(self) -> bool:
        pending = sum(role.num_pending for role in (self.prefill_role, self.decode_role) if role is not None)
        return self.engine.has_unfinished_requests() or pending > 0 or self.images.busy

    # ------------------------------------------------------------------ receive

    def _receive(self, block: bool) -> list[Reply]:
        replies: list[Reply] = []
        if block and not self._poller.poll(IDLE_POLL_MS):
            return replies
        for message, frames in drain(self._input, self._inbound, self.name):
            if isinstance(message, EncodeRequest):
                self.images.queue_encode(message, frames[1] if len(frames) > 1 else b"")
            elif isinstance(message, KVAck):
                if self.prefill_role is not None:
                    self.prefill_role.on_ack(message)
            elif isinstance(message, AbortRequest):
                self._abort(message.request_id)
            else:
                replies += self._accept(message)
        replies += self.images.receive(self.requests)
        if self.decode_role is not None:
            for resumed in self.decode_role.receive():
                replies += self._resume(resumed)
        return replies

    def _accept(self, message: GenerateRequest) -> list[Reply]:
        hands_off = self.prefill_role is not None and PrefillRole.hands_off(message)
        if not self._addresses_registered(message, hands_off):
            return []
        if self.publisher is not None:
            self.publisher.admitted(message)
        self.requests.add(RequestRecord(message, hands_off=hands_off))
        if message.images:  # it starts once its images' embeddings are in (_start_ready)
            error = self.images.park(message)
            return [error] if error is not None else []
        return self._add(message)

    def _addresses_registered(self, message: GenerateRequest, hands_off: bool) -> bool:
        """Whether every address the request makes this worker connect to was registered over Ray: its
        reply_to, and the decode worker's KV socket when this worker ships its KV there."""
        request_id = message.request_id
        if not self.peers.allows("reply", message.reply_to, request_id):
            return False
        target = message.kv_target
        return not hands_off or target is None or self.peers.allows("kv", target.kv_address, request_id)

    def _resume(self, resumed: Resumed) -> list[Reply]:
        """A decode worker goes on with a request prefill handed off: with its KV, or recomputing it."""
        self.requests.add(RequestRecord(resumed.request, kv_transfer_s=resumed.kv_transfer_s))
        return [] if resumed.kv_imported else self._add(resumed.request, resumed.multi_modal)

    def _abort(self, request_id: str) -> None:
        if self.decode_role is not None:  # first: it waits for copies still writing the request's blocks
            self.decode_role.abort(request_id)
        self.engine.abort_request(request_id)
        self.images.drop(request_id)
        self.requests.forget(request_id)

    # ------------------------------------------------------------------ start

    def _start_ready(self) -> list[Reply]:
        """Encode what this worker was asked to (colocated), then start requests whose images are all in."""
        replies: list[Reply] = list(self.images.encode_queued(self.requests))
        for message, multi_modal in self.images.take_ready():
            replies += self._add(message, multi_modal)
        return replies + self.images.expire()

    def _add(self, message: GenerateRequest, multi_modal: MultiModalInputs | None = None) -> list[Reply]:
        record = self.requests.get(message.request_id)
        if record is None:  # aborted meanwhile
            return []
        record.multi_modal = multi_modal if record.hands_off else None
        if message.images:
            record.images_in_s = time.monotonic()
            record.encoder_seconds = self.images.take_encoder_seconds(message.request_id) or record.encoder_seconds
        try:
            self.engine.add_request(
                message.request_id,
                message.prompt_token_ids,
                sampling_params(message.sampling),
                cache_salt=message.cache_salt,
                output_token_ids=message.output_token_ids,
                prefill_only=record.hands_off,
                multi_modal=multi_modal,
            )
        except InvalidRequestError as exc:
            return [RequestError(request_id=message.request_id, message=exc.message, param=exc.param)]
        except Exception as exc:  # a bug must not take the worker down
            logger.error("%s could not add %s: %s", self.name, message.request_id, traceback.format_exc())
            return [
                RequestError(
                    request_id=message.request_id, message=f"internal error: {exc}", type="internal_error", status=500
                )
            ]
        return []

    # ------------------------------------------------------------------ step

    def _step(self, handoffs: list[Handoff]) -> list[Reply]:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.error("%s step failed: %s", self.name, traceback.format_exc())
            return self._fail_all(f"internal error in the engine step: {exc}")
        self.num_steps += 1
        handoffs += outputs.handoffs
        replies: list[Reply] = []
        for output in outputs:
            record = self.requests.get(output.request_id)
            delta = to_delta(output, record.num_top_logprobs if record is not None else 0)
            if record is not None and output.first_token_phases is not None:
                delta.ttft = record.ttft_breakdown(*output.first_token_phases)
                delta.kv_transfer_s, record.kv_transfer_s = record.kv_transfer_s, None
            replies.append(delta)
        return replies

    def _ship(self, handoffs: list[Handoff]) -> None:
        """Prefill: each handed-off request's KV goes to its decode worker, which streams the rest."""
        for handoff in handoffs:
            record = self.requests.forget(handoff.request_id)
            if record is None or self.prefill_role is None:  # aborted in this turn, or not ours to ship
                self.engine.release_kv(handoff.request_id)
                continue
            self.prefill_role.ship(handoff, record)

    def _fail_all(self, message: str) -> list[Reply]:
        errors: list[Reply] = []
        for request_id in self.requests:
            self.engine.abort_request(request_id)
            errors.append(RequestError(request_id=request_id, message=message, type="internal_error", status=500))
        return errors

    # ------------------------------------------------------------------ housekeeping

    def _tick(self) -> None:
        if self.prefill_role is not None:
            self.prefill_role.poll()
        self.kv_events.append(self.engine.kv_cache.pool.take_events())
        if self.publisher is not None:
            self.publisher.publish()

    def _close(self) -> None:
        for role in (self.prefill_role, self.decode_role):
            if role is not None:
                role.close()
        self.images.close()
        self._replies.close()
        if self.publisher is not None:
            self.publisher.close()
        self._input.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.close()
        self._context.term()
