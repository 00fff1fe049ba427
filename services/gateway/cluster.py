"""The gateway's Backend over a pool of engine actors.

Data plane: one PUSH socket per worker carries GenerateRequest / AbortRequest; one PULL socket,
bound by this gateway, receives every worker's OutputBatch (each request names it in `reply_to`).
A receive task routes each delta to the queue of its request's stream.

Control plane (Ray): a health task asks every worker for `info()` each `health_interval_s`. A worker
that does not answer is marked down and placement skips it; each of its requests migrates to a live
worker with the prompt plus the tokens already streamed, so the client's stream goes on where it
stopped (n > 1 requests, which cannot resume, end with a 503 the client may retry). When Ray has
restarted the worker, its new address is picked up and it serves again.

Placement: the global router (services.router) picks the prefill and decode workers by the chosen
policy, from the prefix index (fed by every worker's KV events, pulled with the health check) and
the workers' load. Colocated pools: one worker serves the whole request. Disaggregated pools: the
prefill worker computes the prompt and the first token and ships the KV to the decode worker, which
streams the rest to this gateway; requests with n > 1 go to a decode worker whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from services.common.channels import bind, configure, tcp_address
from services.common.codec import DecodeError, MessageCodec
from services.common.block_hash import MultiModalSpan
from services.common.messages import (AbortRequest, EncodeRequest, GenerateRequest, KVTarget, OutputBatch, RequestDelta,
                                      RequestError, SamplingSpec, WorkerInbound)
from services.gateway.backend import ClusterStats, PromptImage, RequestFailed, WorkerSnapshot
from services.router import Router, RouteRequest
from services.router.load import WorkerLoad
from services.router.router import NoWorkerAvailable
from services.workers.pool import WorkerHandle

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
STATS_TIMEOUT_S = 2.0


@dataclass(eq=False)
class _WorkerLink:
    handle: WorkerHandle
    socket: zmq.asyncio.Socket
    address: str
    alive: bool = True
    in_flight: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Stream:
    message: GenerateRequest
    links: list[_WorkerLink]  # where the request runs: [colocated] or [prefill, decode]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    hit_observed: bool = False
    streamed_token_ids: list[int] = field(default_factory=list)  # what the client has (n == 1)
    images: list[PromptImage] = field(default_factory=list)  # a vision-language prompt's, kept to migrate


def _encode_fields(stats: dict) -> dict:
    """An encode worker's counters as WorkerSnapshot fields (nothing for other workers)."""
    encode = stats.get("encode")
    if encode is None:
        return {}
    return dict(encode_seconds_buckets=tuple(map(tuple, encode["encode_seconds_buckets"])),
                encode_seconds_sum=encode["encode_seconds"], embedding_cache_queries=encode["embedding_cache_queries"],
                embedding_cache_hits=encode["embedding_cache_hits"],
                embedding_bytes_sent=encode["embedding_bytes_sent"])


class ClusterBackend:
    def __init__(self, workers: list[WorkerHandle], *, model_name: str, tokenizer, bind_host: str = "127.0.0.1",
                 health_interval_s: float = 1.0, router_policy: str = "preble", processor=None) -> None:
        if not workers:
            raise ValueError("a cluster needs at least one worker")
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's MultiModalProcessor, else None
        engines = [w for w in workers if w.stage != "encode"]
        self.max_model_len = min(w.info["max_model_len"] for w in engines)
        self.vocab_size = min(w.info["vocab_size"] for w in engines)
        self._context = zmq.asyncio.Context()
        self._results = configure(self._context.socket(zmq.PULL))
        self.reply_to = bind(self._results, tcp_address(bind_host))
        self._links = [self._connect(w, w.address) for w in workers]
        self._encoders = [link for link in self._links if link.handle.stage == "encode"]
        self._by_name = {link.handle.name: link for link in self._links}
        self.disaggregated = any(w.stage == "prefill" for w in workers)
        prefill = [w.name for w in workers if w.stage in ("prefill", "colocated")]
        decode = [w.name for w in workers if w.stage in ("decode", "colocated")]
        encode = [w.name for w in workers if w.stage == "encode"]
        self.router = Router(prefill, decode, router_policy, engines[0].info["block_size"], encode_workers=encode)
        self._event_seq: dict[str, int | None] = {w.name: None for w in workers}  # next KV event batch to read
        self.num_migrations = 0  # requests moved off a dead worker (tristage:request_migrations_total)
        self._streams: dict[str, _Stream] = {}
        self._inbound = MessageCodec(OutputBatch)
        self._outbound = MessageCodec(WorkerInbound)
        self._round_robin = itertools.count()
        self._health_interval_s = health_interval_s
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive_loop(), name="receive"),
                       asyncio.create_task(self._health_loop(), name="health")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for link in self._links:
            link.socket.close(linger=0)
        self._results.close(linger=0)
        self._context.term()

    def is_ready(self) -> bool:
        return all(link.alive for link in self._links)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                       cache_salt: str | None = None, images: Sequence[PromptImage] = ()) -> AsyncIterator[RequestDelta]:
        message = GenerateRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
                                  reply_to=self.reply_to, cache_salt=cache_salt, images=[i.ref for i in images])
        links, message, encoders = self._place(message)
        stream = _Stream(message, links, images=list(images))
        self._streams[request_id] = stream
        for link in links:
            link.in_flight.add(request_id)
        try:
            await self._send_images(stream, encoders)
            await links[0].socket.send_multipart(self._outbound.encode(message))
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
        deliver_to = target.handle.info.get("embedding_address") or ""
        for image, encoder in zip(stream.images, encoders or [target] * len(stream.images)):
            request = EncodeRequest(request_id=stream.message.request_id, image=image.ref, deliver_to=deliver_to)
            await encoder.socket.send_multipart(self._outbound.encode(request, image.data))

    def _place(self, message: GenerateRequest) -> tuple[list[_WorkerLink], GenerateRequest, list[_WorkerLink]]:
        """The router's choice (and each image's encoder); disaggregated n == 1 requests get the decode
        worker as their KV target."""
        spans = [MultiModalSpan(i.content_hash, i.offset, i.length) for i in message.images]
        route = RouteRequest(request_id=message.request_id, token_ids=message.prompt_token_ids,
                             max_tokens=message.sampling.max_tokens, cache_salt=message.cache_salt,
                             image_hashes=[i.content_hash for i in message.images] if self._encoders else (),
                             mm_spans=spans)
        try:
            placement = self.router.place(route)
        except NoWorkerAvailable as exc:
            raise RequestFailed(RequestError(request_id=message.request_id, message=f"no worker can take this "
                                             f"request now ({exc}); retry later", type="service_unavailable",
                                             status=503)) from exc
        prefill, decode = self._by_name[placement.prefill_worker], self._by_name[placement.decode_worker]
        if not (prefill.alive and decode.alive):
            self.router.release(message.request_id)
            raise RequestFailed(RequestError(request_id=message.request_id, message="the chosen worker is down; "
                                             "retry later", type="service_unavailable", status=503))
        encoders = [self._by_name[name] for name in placement.encode_workers]
        if prefill is decode:
            return [prefill], message, encoders
        if message.sampling.n != 1 or (message.images and not self._encoders):
            # several samples of one prompt, or images with no encode pool: one worker serves it whole
            return [decode], message, encoders
        kv_address = decode.handle.info.get("kv_address")
        message.kv_target = KVTarget(worker=decode.handle.name, kv_address=kv_address,
                                     host_id=decode.handle.info.get("host_id", ""))
        return [prefill, decode], message, encoders

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
                logger.error("worker %s is down: %s", link.handle.name, exc)
                link.alive = False
                self.router.remove_worker(link.handle.name)
                self._event_seq[link.handle.name] = None
                await self._migrate_streams(link)
            return
        if info["address"] != link.address:  # restarted by Ray: a new process with a new socket
            logger.info("worker %s is back at %s", link.handle.name, info["address"])
            link.socket.close(linger=0)  # reconnect first: the new process may take its own requests back
            fresh = self._connect(link.handle, info["address"])
            link.socket, link.address = fresh.socket, fresh.address
            link.handle.info = info
            await self._migrate_streams(link)
            self._event_seq[link.handle.name] = None  # a new process: its cache starts empty
        if not link.alive:
            self.router.add_worker(link.handle.name, link.handle.stage)
        link.alive = True
        await self._refresh_router(link)

    async def _refresh_router(self, link: _WorkerLink) -> None:
        """Feed the router this worker's load and the KV events it has not applied yet."""
        name = link.handle.name
        try:
            stats, events = await asyncio.gather(
                asyncio.wait_for(link.handle.actor.stats.remote(), STATS_TIMEOUT_S),
                asyncio.wait_for(link.handle.actor.kv_events.remote(self._event_seq[name]), STATS_TIMEOUT_S))
        except Exception:
            return
        self.router.load.update(WorkerLoad(
            worker=name, stage=stats["stage"], num_running=stats["num_running"], num_waiting=stats["num_waiting"],
            kv_usage=stats["kv_cache_usage"], num_free_blocks=stats["num_free_blocks"],
            queued_prefill_tokens=0, num_decoding=stats["num_running"] if stats["stage"] != "prefill" else 0))
        if stats["stage"] == "encode":  # its embedding cache: what the router sends it images for
            self.router.content_index.replace_worker(name, events["seq"], events["snapshot"])
            return
        index = self.router.index
        if "snapshot" in events:
            index.replace_worker(name, events["seq"], ((h, None) for h in events["snapshot"]))
            self._event_seq[name] = events["seq"] + 1
            return
        for seq, batch in events["batches"]:
            if not index.apply(name, seq, batch):
                self._event_seq[name] = None  # a gap: ask for a snapshot next time
                return
            self._event_seq[name] = seq + 1

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
            target = self._resume_target(stream)
            if target is None:
                stream.queue.put_nowait(RequestError(
                    request_id=request_id, type="service_unavailable", status=503,
                    message=f"worker {dead.handle.name} stopped while serving this request; retry"))
                continue
            # streamed_token_ids is every token the client has, from the first: a second migration
            # resumes after all of them, not after the first migration's tokens twice
            stream.message = stream.message.resume_after(stream.streamed_token_ids)
            stream.links = [target]
            target.in_flight.add(request_id)
            self.num_migrations += 1
            logger.warning("request %s moves from %s to %s after %d streamed tokens", request_id, dead.handle.name,
                           target.handle.name, len(stream.streamed_token_ids))
            encoders = [link for link in self._encoders if link.alive]  # the images again, for the new worker
            await self._send_images(stream, [encoders[i % len(encoders)] for i in range(len(stream.images))]
                                    if encoders else [])
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
                stream.queue.put_nowait(RequestError(request_id=request_id, message=message,
                                                     type="service_unavailable", status=503))

    def _connect(self, handle: WorkerHandle, address: str) -> _WorkerLink:
        socket = configure(self._context.socket(zmq.PUSH))
        socket.connect(address)
        return _WorkerLink(handle, socket, address)

    # ------------------------------------------------------------------ metrics

    async def snapshot(self) -> list[WorkerSnapshot]:
        async def one(link: _WorkerLink) -> WorkerSnapshot | None:
            try:
                s = await asyncio.wait_for(link.handle.actor.stats.remote(), STATS_TIMEOUT_S)
            except Exception:
                return None
            return WorkerSnapshot(worker=s["name"], stage=s["stage"], num_running=s["num_running"],
                                  num_waiting=s["num_waiting"], kv_cache_usage=s["kv_cache_usage"],
                                  num_preemptions=s["num_preemptions"],
                                  prefix_cache_queried_tokens=s["prefix_cache_queried_tokens"],
                                  prefix_cache_hit_tokens=s["prefix_cache_hit_tokens"],
                                  kv_transfer_bytes=s["kv_transfer_bytes_sent"],
                                  kv_transfer_failures=s["kv_transfer_failures"],
                                  kv_transfer_fallbacks=s["kv_transfer_fallbacks"],
                                  kv_transfer_seconds_buckets=tuple(map(tuple, s["kv_transfer_seconds_buckets"])),
                                  kv_transfer_seconds_sum=s["kv_transfer_seconds"], **_encode_fields(s))

        results = await asyncio.gather(*(one(link) for link in self._links))
        return [r for r in results if r is not None]

    def cluster_stats(self) -> ClusterStats:
        stats = self.router.stats()
        return ClusterStats(migrations=self.num_migrations, decisions=dict(stats.decisions),
                            predicted_hit_tokens=stats.predicted_hit_tokens,
                            observed_hit_tokens=stats.observed_hit_tokens, load_imbalance=stats.load_imbalance)
