"""The gateway's Backend over a pool of engine actors.

Data plane: one PUSH socket per worker carries GenerateRequest / AbortRequest; one PULL socket,
bound by this gateway, receives every worker's OutputBatch (each request names it in `reply_to`).
A receive task routes each delta to the queue of its request's stream.

Control plane (Ray): a health task asks every worker for `info()` each `health_interval_s`. A worker
that does not answer is marked down and placement skips it; each of its requests migrates to a live
worker with the prompt plus the tokens already streamed, so the client's stream goes on where it
stopped (n > 1 requests, which cannot resume, end with a 503 the client may retry). When Ray has
restarted the worker, its new addresses are picked up and it serves again.

Worker state (services.common.control), pushed: one SUB socket per worker, connected to its state
socket and read by one task, feeds the router as things happen on the worker:

    worker-stats     router.load.update(WorkerLoad): running, waiting, queued prefill tokens, KV room
    kv-events        router.index, in order (services.gateway.worker_state.KVEventFeed: a gap, or
                     stats naming a batch not seen, asks the worker's kv_events over Ray for a replay)
    embedding-cache  router.content_index (encode workers)
    admitted         a request this gateway sent: the router's in-flight estimate is acknowledged (the
                     worker's stats that follow count it); one another gateway sent: Router.record_remote_placement

Data-plane trust (services.common.security, services.workers.peers): with the cluster's secret every
socket pair is CURVE-authenticated (this gateway's results socket is a CURVE server vetted by its own
ZAP handler; its PUSH and SUB sockets are clients). Workers connect only to addresses a gateway
registered with them over Ray: at start this gateway registers its results address and every
worker's addresses (DataPlanePeers) with each worker, again with all of them whenever a worker comes
back with new addresses, and with any worker whose last registration is out of date at its next
health check; on close it withdraws them. A worker that refuses this gateway's CURVE handshake (a
different cluster secret) is avoided by placement like a quiet one, and the cause is logged.

A worker whose stream has been silent for STATE_STALE_S (it heartbeats every second) is polled over
Ray by the health task instead, as every worker was before the stream existed.

Placement: the global router (services.router) picks the prefill and decode workers by the chosen
policy, from the prefix index and the workers' load. Colocated pools: one worker serves the whole
request. Disaggregated pools: the prefill worker computes the prompt and the first token and ships the
KV to the decode worker, which streams the rest to this gateway; requests with n > 1 go to a decode
worker whole.

Degrade, don't fail: the router knows only the workers this gateway holds alive, so placement skips a
worker from the health check that finds it down until the one that finds it back. A request placed on
it before that (the detection window: up to health_interval_s after a crash, HEALTH_TIMEOUT_S more for
a stopped process) is in its in_flight set and migrates with the rest. A worker gone quiet (no state
message and no info() answer for STATE_STALE_S) is skipped before the health check decides
(Router.suspend_worker), so a stopped process catches new requests for STATE_STALE_S at most. With a
whole stage down the router places requests whole on the survivors ("fallback_whole"); /ready stays
200 while any engine worker is alive (is_ready), so one unavailable worker costs clients time, never
an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from services.common.block_hash import MultiModalSpan
from services.common.channels import bind, configure, connect, tcp_address
from services.common.codec import DecodeError, MessageCodec
from services.common.control import (
    STATE_TOPICS,
    AdmittedRequest,
    EmbeddingCacheSnapshot,
    EngineFacts,
    StateCodec,
    StateDecodeError,
    StateMessage,
    WorkerStats,
)
from services.common.kv_events import KVEventBatch
from services.common.messages import (
    AbortRequest,
    DataPlanePeers,
    EncodeRequest,
    GenerateRequest,
    KVTarget,
    OutputBatch,
    RequestDelta,
    RequestError,
    SamplingSpec,
    TTFTBreakdown,
    WorkerInbound,
)
from services.common.security import CLUSTER_SECRET_ENV, ClusterSecret, derive_keys, start_authenticator
from services.gateway.backend import ClusterStats, PromptImage, RequestFailed, WorkerSnapshot
from services.gateway.room_queue import RoomQueue, RoomWaitTimeout
from services.gateway.worker_restarts import WorkerRestarts
from services.gateway.worker_state import KVEventFeed, worker_load, worker_snapshot
from services.router import Router, RouterConfig, RouteRequest
from services.router.router import NoRoomNow, NoWorkerAvailable
from services.workers.pool import WorkerHandle

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
STATS_TIMEOUT_S = 2.0
STATE_STALE_S = 3.0  # a worker's stream silent this long (three missed heartbeats): poll it over Ray
REGISTER_TIMEOUT_S = 5.0  # a worker's answer to register_peers / unregister_gateway
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,  # the server could not open our HELLO: another server key
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,  # the server's ZAP handler refused our client key
)
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(HANDSHAKE_FAILURES)


@dataclass(eq=False)
class _WorkerLink:
    handle: WorkerHandle
    socket: zmq.asyncio.Socket
    address: str
    alive: bool = True
    in_flight: set[str] = field(default_factory=set)
    state_address: str = ""  # the worker state socket the SUB task reads ("": none yet)
    state_task: asyncio.Task | None = None
    last_state_at: float = float("-inf")  # monotonic time of its last state message
    last_info_at: float = field(default_factory=time.monotonic)  # ... and of its last answer to info()
    kv_feed: KVEventFeed | None = None  # engine workers: their KV events into the router's index
    registered: DataPlanePeers | None = None  # what this worker process last accepted from register_peers
    handshake_refused: bool = False  # its state socket refused our CURVE handshake (another cluster secret)

    @property
    def streaming(self) -> bool:
        """Its state stream is live: its stats and admitted requests arrive as they happen."""
        return time.monotonic() - self.last_state_at < STATE_STALE_S

    @property
    def quiet(self) -> bool:
        """Neither its state stream (a heartbeat a second) nor Ray's info() has heard from it for
        STATE_STALE_S: stopped or stuck, or only slow; the health check has not decided yet."""
        return time.monotonic() - max(self.last_state_at, self.last_info_at) >= STATE_STALE_S

    @property
    def unreachable(self) -> bool:
        """Placement should avoid it: quiet, or its data plane refuses this gateway (answering over Ray
        proves nothing about the sockets requests travel on)."""
        return self.quiet or self.handshake_refused


@dataclass(eq=False)
class _Stream:
    message: GenerateRequest
    links: list[_WorkerLink]  # where the request runs: [colocated] or [prefill, decode]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    hit_observed: bool = False
    streamed_token_ids: list[int] = field(default_factory=list)  # what the client has (n == 1)
    images: list[PromptImage] = field(default_factory=list)  # a vision-language prompt's, kept to migrate


class ClusterBackend:
    def __init__(
        self,
        workers: list[WorkerHandle],
        *,
        model_name: str,
        tokenizer,
        bind_host: str = "127.0.0.1",
        health_interval_s: float = 1.0,
        router_policy: str = "preble",
        router_config: RouterConfig | None = None,
        processor=None,
        cluster_secret: ClusterSecret | None = None,
    ) -> None:
        """`cluster_secret`: authenticate the data plane with the keys derived from it (None: plain sockets);
        the workers must have been started with the same one."""
        if not workers:
            raise ValueError("a cluster needs at least one worker")
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's MultiModalProcessor, else None
        engines = [_engine_facts(w) for w in workers if w.stage != "encode"]
        self.max_model_len = min(e.max_model_len for e in engines)
        self.vocab_size = min(e.vocab_size for e in engines)
        self._context = zmq.asyncio.Context()
        self._keys = derive_keys(cluster_secret) if cluster_secret is not None else None
        self._authenticator = start_authenticator(self._context, self._keys, "gateway")  # before any bind
        # OutputBatch: one engine step's deltas for this gateway's requests (a token or a few each, with
        # their logprobs); far below the codec's header limit, which is what the socket allows
        self._results = configure(self._context.socket(zmq.PULL))
        self.reply_to = bind(self._results, tcp_address(bind_host), self._keys)
        self._links = [self._connect(w, w.address) for w in workers]
        self._encoders = [link for link in self._links if link.handle.stage == "encode"]
        self._by_name = {link.handle.name: link for link in self._links}
        self.disaggregated = any(w.stage == "prefill" for w in workers)
        prefill = [w.name for w in workers if w.stage in ("prefill", "colocated")]
        decode = [w.name for w in workers if w.stage in ("decode", "colocated")]
        encode = [w.name for w in workers if w.stage == "encode"]
        self.router = Router(
            prefill,
            decode,
            router_policy,
            engines[0].block_size,
            router_config or RouterConfig(),
            encode_workers=encode,
        )
        for link in self._links:
            if link.handle.stage != "encode":
                link.kv_feed = KVEventFeed(link.handle.name, self.router.index)
        self._state_codec = StateCodec()
        self._replays: set[asyncio.Task] = set()  # KV event replays in flight (kept referenced until done)
        self.num_migrations = 0  # requests moved off a dead worker (tristage:request_migrations_total)
        self.restarts = WorkerRestarts()  # tristage:worker_restarts_total, tristage:worker_crash_looping
        for w in workers:
            self.restarts.add_worker(w.name, w.stage)
        self._streams: dict[str, _Stream] = {}
        self._room_queue = RoomQueue()  # requests waiting for decode KV room
        self._inbound = MessageCodec(OutputBatch)
        self._outbound = MessageCodec(WorkerInbound)
        self._round_robin = itertools.count()
        self._health_interval_s = health_interval_s
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # first: a worker drops every request whose reply_to it was not told about over Ray
        await self._register_all()
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="receive"),
            asyncio.create_task(self._health_loop(), name="health"),
        ]
        for link in self._links:
            self._subscribe(link)

    async def close(self) -> None:
        tasks = [*self._tasks, *self._replays, *(link.state_task for link in self._links if link.state_task)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(self._unregister(link) for link in self._links))
        for link in self._links:
            link.socket.close(linger=0)
        self._results.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.close()
        self._context.term()

    def is_ready(self) -> bool:
        """The cluster can serve: at least one engine worker is alive (each runs a whole engine, and the
        router places requests whole on the survivors of a missing stage). /health is the process alone.

        Not required: every pool whole (a dead or restarting worker costs clients time, not errors), nor
        a live encoder. Readiness gates every request (text ones too), so one encode pool down would
        refuse them all; instead an image request finds no encoder at placement and gets its own 503.
        """
        return any(link.alive for link in self._links if link.handle.stage != "encode")

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        cache_salt: str | None = None,
        images: Sequence[PromptImage] = (),
    ) -> AsyncIterator[RequestDelta]:
        called_s = time.monotonic()
        message = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            reply_to=self.reply_to,
            cache_salt=cache_salt,
            images=[i.ref for i in images],
        )
        links, message, encoders = await self._place_when_room(message)
        stream = _Stream(message, links, images=list(images))
        # registered before the first await: a worker found down from here on migrates this stream
        # (_migrate_streams), so a request sent to a dead worker's socket in the window before the
        # health check notices is resent to a live one, not lost
        self._streams[request_id] = stream
        for link in links:
            link.in_flight.add(request_id)
        try:
            await self._send_images(stream, encoders)
            if stream.message is message:  # else a migration during the image sends has sent it already
                await links[0].socket.send_multipart(self._outbound.encode(message))
            dispatch_s = time.monotonic() - called_s  # placement, any wait for KV room, the image sends
            if not links[0].streaming:  # else the worker's admitted message acknowledges it (_on_admitted)
                self.router.acknowledge(request_id)
            pending: dict[int, RequestDelta] = {}  # n == 1 deltas that arrived ahead of their turn
            while True:
                item = await stream.queue.get()
                if isinstance(item, RequestError):
                    stream.finished = True
                    raise RequestFailed(item)
                for delta in self._in_order(stream, pending, item):
                    if not stream.hit_observed:  # the prefill worker's real prefix-cache hit
                        stream.hit_observed = True
                        self.router.observe_hit(request_id, stream.links[0].handle.name, delta.num_cached_tokens)
                        # the worker's part of the TTFT breakdown, and ours (services.gateway.ttft)
                        delta.ttft = msgspec.structs.replace(delta.ttft or TTFTBreakdown(), dispatch_s=dispatch_s)
                    if sampling.n == 1:
                        for completion in delta.completions:
                            stream.streamed_token_ids += completion.token_ids
                    if len(stream.links) == 2 and stream.streamed_token_ids:  # prefill's part is done
                        stream.links.pop(0).in_flight.discard(request_id)
                    stream.finished = delta.finished
                    yield delta
                    if delta.finished:
                        return
        finally:
            self._streams.pop(request_id, None)
            for link in stream.links:
                link.in_flight.discard(request_id)
            if not stream.finished:  # the consumer went away: free the workers' blocks now
                for link in stream.links:
                    self._send_abort(link, request_id)

    @staticmethod
    def _in_order(stream: _Stream, pending: dict[int, RequestDelta], item: RequestDelta) -> list[RequestDelta]:
        """The deltas now deliverable in token order (a prefill worker's first token may arrive after the
        decode worker's next ones: they come from two sockets)."""
        if stream.message.sampling.n != 1 or not item.completions:
            return [item]
        pending[item.completions[0].start_index] = item
        ready, expected = [], len(stream.streamed_token_ids)
        while expected in pending:
            delta = pending.pop(expected)
            ready.append(delta)
            num_tokens = len(delta.completions[0].token_ids)
            if num_tokens == 0:
                break
            expected += num_tokens
        return ready

    async def _send_images(self, stream: _Stream, encoders: Sequence[_WorkerLink]) -> None:
        """Each image to its encoder (or, with no encode pool, to the colocated worker that encodes itself),
        its embedding to be delivered to the worker computing the prompt."""
        target = stream.links[0]
        deliver_to = target.handle.info.embedding_address or ""
        for image, encoder in zip(stream.images, encoders or [target] * len(stream.images)):
            request = EncodeRequest(request_id=stream.message.request_id, image=image.ref, deliver_to=deliver_to)
            await encoder.socket.send_multipart(self._outbound.encode(request, image.data))

    async def _place_when_room(
        self, message: GenerateRequest
    ) -> tuple[list[_WorkerLink], GenerateRequest, list[_WorkerLink]]:
        """_place, queued in arrival order while no decode worker has KV room for it (services.gateway.room_queue)."""
        try:
            return await self._room_queue.place(lambda: self._place(message))
        except RoomWaitTimeout as exc:
            raise _unavailable(message.request_id, f"no worker can take this request now ({exc}); retry later") from exc

    def _place(self, message: GenerateRequest) -> tuple[list[_WorkerLink], GenerateRequest, list[_WorkerLink]]:
        """The router's choice (and each image's encoder); disaggregated n == 1 requests get the decode
        worker as their KV target. The router knows only live workers (a worker found down leaves it
        until it is back), so with a whole stage down it places the request whole on a survivor
        (prefill_worker == decode_worker, reason "fallback_whole") and only an empty cluster refuses."""
        spans = [MultiModalSpan(i.content_hash, i.offset, i.length) for i in message.images]
        route = RouteRequest(
            request_id=message.request_id,
            token_ids=message.prompt_token_ids,
            max_tokens=message.sampling.max_tokens,
            cache_salt=message.cache_salt,
            image_hashes=[i.content_hash for i in message.images] if self._encoders else (),
            mm_spans=spans,
        )
        self._suspend_quiet_workers()
        try:
            placement = self.router.place(route)
        except NoRoomNow:
            raise  # the room queue waits for room
        except NoWorkerAvailable as exc:
            raise _unavailable(message.request_id, f"no worker can take this request now ({exc}); retry later") from exc
        prefill, decode = self._by_name[placement.prefill_worker], self._by_name[placement.decode_worker]
        if not (prefill.alive and decode.alive):
            self.router.release(message.request_id)
            raise _unavailable(message.request_id, "the chosen worker is down; retry later")
        encoders = [self._by_name[name] for name in placement.encode_workers]
        if prefill is decode:
            return [prefill], message, encoders
        if message.sampling.n != 1 or (message.images and not self._encoders):
            # several samples of one prompt, or images with no encode pool: one worker serves it whole
            return [decode], message, encoders
        kv_address = decode.handle.info.kv_address
        if kv_address is None:
            raise ValueError(f"decode worker {decode.handle.name} has no KV address")
        message.kv_target = KVTarget(
            worker=decode.handle.name, kv_address=kv_address, host_id=decode.handle.info.host_id
        )
        return [prefill, decode], message, encoders

    def _suspend_quiet_workers(self) -> None:
        """Placement skips a live engine worker gone quiet (_WorkerLink.quiet) until it is heard from again.
        A stopped worker is thus avoided after STATE_STALE_S, not only once the health check's info() call
        times out (HEALTH_TIMEOUT_S later); a merely slow one is used again at its next heartbeat."""
        for link in self._links:
            if not link.alive or link.kv_feed is None:  # down: out of the router already; encoders: not judged
                continue
            name, suspended = link.handle.name, link.handle.name in self.router.suspended
            if link.unreachable and not suspended:
                logger.warning("worker %s has gone quiet: placement avoids it until it is heard from", name)
                self.router.suspend_worker(name)
            elif not link.unreachable and suspended:
                logger.info("worker %s is heard from again: placement uses it", name)
                self.router.resume_worker(name)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            for link in stream.links:
                self._send_abort(link, request_id)

    def _send_abort(self, link: _WorkerLink, request_id: str) -> None:
        # NOBLOCK never waits (safe inside a closing generator); a full queue means the worker is gone anyway
        with contextlib.suppress(zmq.ZMQError):
            link.socket.send_multipart(self._outbound.encode(AbortRequest(request_id=request_id)), flags=zmq.NOBLOCK)

    # ------------------------------------------------------------------ background tasks

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._results.recv_multipart()
            try:
                batch = self._inbound.decode(frames)
            except DecodeError as exc:
                logger.warning("dropped a malformed worker message: %s", exc)
                continue
            for item in batch.items:
                stream = self._streams.get(item.request_id)
                # only the workers now serving the request speak for it (not one it migrated away from)
                if stream is not None and any(link.handle.name == batch.worker for link in stream.links):
                    stream.queue.put_nowait(item)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._check(link) for link in self._links))
            await asyncio.sleep(self._health_interval_s)

    async def _check(self, link: _WorkerLink) -> None:
        try:
            info = await asyncio.wait_for(link.handle.actor.info.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # RayActorError, timeout: the worker is gone or stuck
            if link.alive:
                # a timeout's text is empty: say what did not happen instead (a cut link, a stopped process)
                reason = (
                    f"{type(exc).__name__}: {exc}" if str(exc) else f"no answer to info() in {HEALTH_TIMEOUT_S:g} s"
                )
                logger.error("worker %s is down: %s", link.handle.name, reason)
                self.restarts.on_down(link.handle.name, reason)
                link.alive = False
                self.router.remove_worker(link.handle.name)
                self._room_queue.notify()  # a whole stage gone: the head is placed on the survivors
                if link.kv_feed is not None:
                    link.kv_feed.reset()
                await self._migrate_streams(link)
            return
        link.last_info_at = time.monotonic()
        self.restarts.on_info(link.handle.name, info.num_restarts, link.last_info_at)
        if info.input_address != link.address:  # restarted by Ray: a new process with new sockets
            logger.info("worker %s is back at %s", link.handle.name, info.input_address)
            link.socket.close(linger=0)  # reconnect first: the new process may take its own requests back
            fresh = self._connect(link.handle, info.input_address)
            link.socket, link.address = fresh.socket, fresh.address
            link.handle.info = info
            # the new process knows no address, and every other worker must learn its new ones (acks, KV),
            # before a request goes to it or through it
            link.registered = None
            await self._register_all()
            await self._migrate_streams(link)
            if link.kv_feed is not None:  # a new process: its cache starts empty, its batches from 0
                link.kv_feed.reset()
        if info.state_address != link.state_address:
            link.handle.info = info
            self._subscribe(link)
        if link.registered != self._peers():  # an earlier registration failed, or a peer moved since
            await self._register(link, self._peers())
        if not link.alive:
            logger.info("worker %s is up again: placement uses it", link.handle.name)
            self.router.add_worker(link.handle.name, link.handle.stage)
        link.alive = True
        if not link.streaming:
            await self._poll_state(link)

    async def _poll_state(self, link: _WorkerLink) -> None:
        """Over Ray, what the worker's stream would have said: its stats, and its KV events or embedding
        cache (for a worker whose stream is silent: not yet connected, or lost)."""
        try:
            stats = await asyncio.wait_for(link.handle.actor.stats.remote(), STATS_TIMEOUT_S)
            if link.kv_feed is None:
                cache = await asyncio.wait_for(link.handle.actor.embedding_cache.remote(), STATS_TIMEOUT_S)
                self._on_embedding_cache(link, cache)
        except Exception:
            return
        self._on_stats(link, stats)

    # ------------------------------------------------------------------ worker state (pushed)

    def _subscribe(self, link: _WorkerLink) -> None:
        """(Re)start the task that reads the worker's state socket (its address from the last info())."""
        if link.state_task is not None:
            link.state_task.cancel()
        link.state_address = link.handle.info.state_address
        link.state_task = asyncio.create_task(
            self._state_loop(link, link.state_address), name=f"state-{link.handle.name}"
        )

    async def _state_loop(self, link: _WorkerLink, address: str) -> None:
        """The one reader of one SUB socket: decode each message and feed the router. Never blocks the loop."""
        # frames [topic, seq, payload]: the payload is the largest, bounded by StateCodec's limit (a step's
        # KV events, a long prompt's block hashes, an encoder's cached hashes all stay far below it)
        socket = configure(self._context.socket(zmq.SUB), self._state_codec.max_payload_bytes)
        for topic in STATE_TOPICS:
            socket.setsockopt(zmq.SUBSCRIBE, topic)
        watch = None
        if self._keys is not None:  # a CURVE handshake can fail: say why, once, and avoid the worker
            watch = asyncio.create_task(self._watch_handshakes(link, socket.get_monitor_socket(HANDSHAKE_EVENTS)))
        try:
            connect(socket, address, self._keys)
            while True:
                frames = await socket.recv_multipart()
                try:
                    message = self._state_codec.decode(frames)
                except StateDecodeError as exc:
                    logger.warning("dropped a malformed state message from %s: %s", link.handle.name, exc)
                    continue
                if link.alive:  # a worker marked down is forgotten until the health check sees it back
                    link.last_state_at = time.monotonic()
                    self._on_state(link, message)
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                socket.disable_monitor()
            socket.close(linger=0)

    async def _watch_handshakes(self, link: _WorkerLink, monitor: zmq.asyncio.Socket) -> None:
        """Follow the CURVE handshakes of a worker's state socket: one that fails means the worker holds
        another cluster secret (or is not ours), so its sockets will never carry our requests either."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    link.handshake_refused = False
                elif event in HANDSHAKE_FAILURES and not link.handshake_refused:
                    link.handshake_refused = True
                    logger.error(
                        "worker %s refuses this gateway's data-plane handshake at %s: its cluster secret differs "
                        "from this gateway's (%s, or --cluster-secret-file). Placement avoids it; give every "
                        "gateway of the cluster the secret its workers were started with",
                        link.handle.name,
                        link.state_address,
                        CLUSTER_SECRET_ENV,
                    )
        finally:
            monitor.close(linger=0)

    def _on_state(self, link: _WorkerLink, message: StateMessage) -> None:
        body = message.body
        if isinstance(body, KVEventBatch):
            if link.kv_feed is not None:
                link.kv_feed.on_batch(message.seq, body.events)
                self._replay_if_needed(link)
        elif isinstance(body, WorkerStats):
            self._on_stats(link, body)
        elif isinstance(body, AdmittedRequest):
            self._on_admitted(body)
        elif isinstance(body, EmbeddingCacheSnapshot):
            self._on_embedding_cache(link, body)

    def _on_stats(self, link: _WorkerLink, stats: WorkerStats) -> None:
        self.router.load.update(worker_load(stats))
        self._room_queue.notify()
        if link.kv_feed is not None and stats.next_kv_event_seq is not None:
            link.kv_feed.on_worker_next_seq(stats.next_kv_event_seq)
            self._replay_if_needed(link)

    def _on_embedding_cache(self, link: _WorkerLink, cache: EmbeddingCacheSnapshot) -> None:
        """An encode worker's cache contents: the images the router sends it."""
        self.router.content_index.replace_worker(link.handle.name, cache.seq, cache.content_hashes)

    def _on_admitted(self, admitted: AdmittedRequest) -> None:
        if admitted.reply_to == self.reply_to:
            # ours: the worker's stats from now on count it, so the router's estimate may go with them
            self.router.acknowledge(admitted.request_id)
            return
        # another gateway's placement: count its load and claim its blocks here too, until the worker's
        # own stats and KV events do (request ids are uuids, unique across gateways)
        self.router.record_remote_placement(
            admitted.request_id,
            admitted.worker,
            admitted.block_hashes,
            admitted.num_prompt_tokens,
            decode_worker=admitted.decode_worker,
            max_tokens=admitted.max_tokens,
        )

    def _replay_if_needed(self, link: _WorkerLink) -> None:
        """Ask the worker for the KV event batches its feed is missing (one replay at a time)."""
        feed = link.kv_feed
        if feed is None or not feed.wants_replay:
            return
        next_seq, token = feed.start_replay()
        task = asyncio.create_task(self._replay(link, feed, next_seq, token), name=f"replay-{link.handle.name}")
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def _replay(self, link: _WorkerLink, feed: KVEventFeed, next_seq: int | None, token: int) -> None:
        try:
            reply = await asyncio.wait_for(link.handle.actor.kv_events.remote(next_seq), STATS_TIMEOUT_S)
        except Exception as exc:  # the worker is gone or stuck: the health check decides; retried on the next gap
            logger.warning("worker %s did not replay its KV events: %s", link.handle.name, exc)
            feed.on_replay_failed(token)
            return
        feed.on_reply(reply, token)
        self._replay_if_needed(link)  # the batches held meanwhile may show another gap

    async def _migrate_streams(self, dead: _WorkerLink) -> None:
        """Move every request the dead worker was serving to a live one, resuming after what was streamed."""
        for request_id in list(dead.in_flight):
            stream = self._streams.get(request_id)
            dead.in_flight.discard(request_id)
            if stream is None or stream.finished:
                continue
            for link in stream.links:  # the survivor of a prefill/decode pair drops its part
                if link is not dead:
                    link.in_flight.discard(request_id)
                    self._send_abort(link, request_id)
            # a worker found down may only be stopped or stuck (SIGSTOP, a long pause), not dead: its socket
            # delivers in order, so this abort reaches it after the request, and a worker that comes back
            # in the same process drops the request instead of serving (or handing off) a second copy
            self._send_abort(dead, request_id)
            target = self._resume_target(stream)
            if target is None:
                stream.queue.put_nowait(
                    RequestError(
                        request_id=request_id,
                        type="service_unavailable",
                        status=503,
                        message=f"worker {dead.handle.name} stopped while serving this request; retry",
                    )
                )
                continue
            # streamed_token_ids is every token the client has, from the first: a second migration
            # resumes after all of them, not after the first migration's tokens twice
            stream.message = stream.message.resume_after(stream.streamed_token_ids)
            stream.links = [target]
            target.in_flight.add(request_id)
            self.num_migrations += 1
            logger.warning(
                "request %s moves from %s to %s after %d streamed tokens",
                request_id,
                dead.handle.name,
                target.handle.name,
                len(stream.streamed_token_ids),
            )
            encoders = [link for link in self._encoders if link.alive]  # the images again, for the new worker
            await self._send_images(
                stream, [encoders[i % len(encoders)] for i in range(len(stream.images))] if encoders else []
            )
            await target.socket.send_multipart(self._outbound.encode(stream.message))

    def _resume_target(self, stream: _Stream) -> _WorkerLink | None:
        """A live worker to finish the request alone: a decode or colocated one if any is up, else a
        prefill worker (every worker runs a whole engine). None if nothing is up or it cannot resume."""
        if stream.message.sampling.n != 1:
            return None
        alive = [link for link in self._links if link.alive]
        preferred = [link for link in alive if link.handle.stage in ("decode", "colocated")] or alive
        return min(preferred, key=lambda link: len(link.in_flight), default=None)

    def fail_all(self, message: str) -> None:
        """End every open stream with a 503 error (shutdown after the drain timeout)."""
        for link in self._links:
            self._fail_streams(link, message)

    def _fail_streams(self, link: _WorkerLink, message: str) -> None:
        for request_id in list(link.in_flight):
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(
                    RequestError(request_id=request_id, message=message, type="service_unavailable", status=503)
                )

    def _connect(self, handle: WorkerHandle, address: str) -> _WorkerLink:
        # a PUSH socket receives nothing: its inbound limit is moot (the worker's input socket has the one)
        socket = connect(configure(self._context.socket(zmq.PUSH)), address, self._keys)
        return _WorkerLink(handle, socket, address)

    # ------------------------------------------------------------------ peer registration (Ray)

    def _peers(self) -> DataPlanePeers:
        """This gateway's results address and every worker's addresses, as the last info() calls gave them."""
        infos = [link.handle.info for link in self._links]
        return DataPlanePeers(
            reply_address=self.reply_to,
            input_addresses=[i.input_address for i in infos if i.stage != "encode"],
            kv_addresses=[i.kv_address for i in infos if i.kv_address is not None],
            embedding_addresses=[i.embedding_address for i in infos if i.embedding_address is not None],
        )

    async def _register_all(self) -> None:
        peers = self._peers()
        await asyncio.gather(*(self._register(link, peers) for link in self._links if link.alive))

    async def _register(self, link: _WorkerLink, peers: DataPlanePeers) -> None:
        """Tell one worker where it may connect; a failure is retried at its next health check."""
        try:
            await asyncio.wait_for(link.handle.actor.register_peers.remote(peers), REGISTER_TIMEOUT_S)
        except Exception as exc:  # gone or stuck: the health check decides; registration follows it back
            logger.warning("could not register this gateway's addresses with worker %s: %s", link.handle.name, exc)
            return
        link.registered = peers

    async def _unregister(self, link: _WorkerLink) -> None:
        if link.registered is None:
            return
        with contextlib.suppress(Exception):  # a worker that cannot be told forgets us when its table fills
            await asyncio.wait_for(link.handle.actor.unregister_gateway.remote(self.reply_to), REGISTER_TIMEOUT_S)

    # ------------------------------------------------------------------ metrics

    async def snapshot(self) -> list[WorkerSnapshot]:
        async def one(link: _WorkerLink) -> WorkerSnapshot | None:
            try:
                s = await asyncio.wait_for(link.handle.actor.stats.remote(), STATS_TIMEOUT_S)
            except Exception:
                return None
            return worker_snapshot(s)

        results = await asyncio.gather(*(one(link) for link in self._links))
        return [r for r in results if r is not None]

    def cluster_stats(self) -> ClusterStats:
        stats = self.router.stats()
        return ClusterStats(
            migrations=self.num_migrations,
            kv_room_waits=self._room_queue.num_waited,
            waiting_for_kv_room=len(self._room_queue),
            decisions=dict(stats.decisions),
            predicted_hit_tokens=stats.predicted_hit_tokens,
            observed_hit_tokens=stats.observed_hit_tokens,
            load_imbalance=stats.load_imbalance,
            worker_restarts=self.restarts.snapshot(time.monotonic()),
        )


def _unavailable(request_id: str, message: str) -> RequestFailed:
    """A 503: no worker can serve the request now; the client may retry."""
    return RequestFailed(RequestError(request_id=request_id, message=message, type="service_unavailable", status=503))


def _engine_facts(handle: WorkerHandle) -> EngineFacts:
    if handle.info.engine is None:
        raise ValueError(f"worker {handle.name} ({handle.stage}) has no engine")
    return handle.info.engine
