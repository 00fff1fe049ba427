"""A worker's heartbeat: receive requests over ZeroMQ, step the engine, send token deltas back.

    loop:  receive (block only when idle) -> engine.step() -> hand off prefilled KV -> send one
           OutputBatch per gateway

Vision-language prompts: their images' embeddings arrive from encode workers on the embedding
socket (services.workers.multimodal_inbox holds them until the request is there too); a colocated
worker also takes EncodeRequests itself and encodes in-process (it has an ImageEncoder).

Roles (one engine each; services.workers.kv_transfer moves the KV):
  * colocated: prompt and every token.
  * prefill: a request that names a `kv_target` runs to its first token, which streams to the
    gateway; then its KV goes to the decode worker and its blocks are freed on the ack or lease end.
    Requests without a target (n > 1, fallbacks) are served in full, as colocated.
  * decode: also receives KV on its own socket; an imported request decodes from its second token on.
    A transfer that is refused or times out is recomputed here, so the stream completes anyway.

The loop owns the engine; nothing else touches it. Control-plane calls (stats, health) come from
other threads and only read counters. Each request names the output socket (`reply_to`) of the
gateway that sent it, so one worker serves any number of gateway replicas.

Failure policy: a request the engine refuses gets a RequestError (400 with the parameter named);
an unexpected error inside a step fails every request in flight with a 500-class error and frees
their blocks, and the loop goes on serving new requests.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import defaultdict

import torch
import zmq

from services.common.channels import bind, configure, drain
from services.common.codec import DecodeError, MessageCodec
from services.common.errors import InvalidRequestError
from services.common.messages import (AbortRequest, CompletionDelta, EmbeddingInbound, EncodeRequest,
                                      GenerateRequest, ImageEmbedding, KVAck, KVTransfer, OutputBatch,
                                      PositionLogprobs, RequestDelta, RequestError, SamplingSpec, TokenLogprob,
                                      WorkerInbound)
from services.engine import LLMEngine, SamplingParams
from services.engine.outputs import CompletionOutput, Logprob, RequestOutput
from services.workers.event_log import KVEventLog
from services.engine.multimodal import MultiModalInputs
from services.workers.kv_staging import StagingBuffer, host_identity
from services.workers.encode_worker import (MAX_EMBEDDING_MESSAGE_BYTES, embedding_frame, embedding_from_frame,
                                           rows_from_frame)
from services.workers.multimodal_inbox import MultiModalInbox
from services.workers.kv_transfer import (KV_STREAMS, MAX_KV_MESSAGE_BYTES, KVReceiver, KVSender, TransferStats,
                                          engine_layout)

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50  # how long an idle loop waits for a request before checking for shutdown
# a prefill worker's shared-memory staging buffer for outgoing KV, by device (the CPU engine's KV is small)
DEFAULT_KV_STAGING_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams(**{f: getattr(spec, f) for f in spec.__struct_fields__})


class EngineWorker:
    def __init__(self, engine: LLMEngine, input_address: str, name: str = "worker-0", *, role: str = "colocated",
                 kv_address: str | None = None, model_name: str = "model", kv_lease_s: float = 30.0,
                 kv_timeout_s: float = 10.0, kv_staging_bytes: int | None = None, image_encoder=None) -> None:
        self.engine = engine
        self.name = name
        self.role = role
        self.host_id = host_identity()
        self._context = zmq.Context(io_threads=KV_STREAMS if role != "colocated" else 1)
        self._input = configure(self._context.socket(zmq.PULL))
        self.input_address = bind(self._input, input_address)
        self.transfer_stats = TransferStats()
        layout = engine_layout(engine, model_name)
        cuda = engine.runner.device.type == "cuda"
        if kv_staging_bytes is None:
            kv_staging_bytes = DEFAULT_KV_STAGING_BYTES["cuda" if cuda else "cpu"]
        self._staging = _open_staging(kv_staging_bytes, pin=cuda) if role == "prefill" else None
        self._sender = KVSender(engine, self._context, layout, self.input_address, kv_lease_s, self.transfer_stats,
                                staging=self._staging, host_id=self.host_id)
        self._receiver: KVReceiver | None = None
        self.kv_address: str | None = None
        if role == "decode":
            kv_socket = configure(self._context.socket(zmq.PULL), MAX_KV_MESSAGE_BYTES)
            self.kv_address = bind(kv_socket, kv_address or input_address.rsplit(":", 1)[0] + ":0")
            self._receiver = KVReceiver(engine, self._context, kv_socket, layout, kv_timeout_s, self.transfer_stats,
                                        pin_staging=cuda, image_inputs=self._transfer_images)
        self._poller = zmq.Poller()
        self._poller.register(self._input, zmq.POLLIN)
        if self._receiver is not None:
            self._poller.register(self._receiver.socket, zmq.POLLIN)
        # vision-language models: embeddings from encoders (prefill, colocated), or encoded here (colocated)
        self.image_encoder = image_encoder
        self._mm_inbox = MultiModalInbox(engine.vision_language)
        self._to_encode: list[tuple[EncodeRequest, bytes]] = []
        self._handoff_mm: dict[str, MultiModalInputs] = {}  # prefill: images that go along with the KV
        self._embeddings: zmq.Socket | None = None
        self.embedding_address: str | None = None
        if engine.vision_language is not None and role != "decode":
            self._embeddings = configure(self._context.socket(zmq.PULL), MAX_EMBEDDING_MESSAGE_BYTES)
            self.embedding_address = bind(self._embeddings, input_address.rsplit(":", 1)[0] + ":0")
            self._poller.register(self._embeddings, zmq.POLLIN)
        self._embedding_codec = MessageCodec(EmbeddingInbound)
        self._image_failures: dict[str, str] = {}  # request id -> why, for a GenerateRequest still to come
        self._handoffs: dict[str, GenerateRequest] = {}  # prefill: requests whose KV goes to a decode worker
        self.kv_events = KVEventLog(engine.kv_cache.pool.cached_hashes)
        self._outputs: dict[str, zmq.Socket] = {}  # reply_to address -> PUSH socket
        self._reply_to: dict[str, str] = {}  # request id -> reply_to
        self._num_logprobs: dict[str, int] = {}  # request id -> top logprobs asked (when asked)
        self._inbound = MessageCodec(WorkerInbound)
        self._outbound = MessageCodec(OutputBatch)
        self._stop = threading.Event()
        self.num_steps = 0

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        logger.info("%s serving on %s", self.name, self.input_address)
        while not self._stop.is_set():
            items: list[RequestDelta | RequestError] = self._receive(block=not self._busy())
            items += self._admit_images()
            shipments: list[tuple[GenerateRequest, list[int]]] = []
            if self.engine.has_unfinished_requests():
                items += self._hand_off(self._step(), shipments)
            self._sender.poll()
            self._sender.expire_leases()
            self.kv_events.append(self.engine.kv_cache.pool.take_events())
            self._send(items)  # first tokens leave before their KV, so the gateway usually sees them first
            for message, first_tokens in shipments:
                self._ship(message, first_tokens)
                self._forget(message.request_id)
        self._close()

    def _busy(self) -> bool:
        pending = self._receiver.num_pending if self._receiver is not None else 0
        return (self.engine.has_unfinished_requests() or pending > 0 or self._sender.num_leases > 0
                or bool(self._to_encode))

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ receive

    def _receive(self, block: bool) -> list[RequestDelta | RequestError]:
        errors: list[RequestDelta | RequestError] = []
        if block and not self._poller.poll(IDLE_POLL_MS):
            return errors
        for message, frames in drain(self._input, self._inbound, self.name):
            if isinstance(message, EncodeRequest):
                self._to_encode.append((message, frames[1] if len(frames) > 1 else b""))
                continue
            error = self._handle(message)
            if error is not None:
                errors.append(error)
        if self._receiver is not None:
            errors += self._receive_kv()
        if self._embeddings is not None:
            errors += self._receive_embeddings()
        return errors

    def _receive_embeddings(self) -> list[RequestError]:
        """Drain the embedding socket while the inbox has room (a full inbox holds the encoders back)."""
        assert self._embeddings is not None
        errors = []
        if not self._mm_inbox.has_room:
            return errors
        for message, frames in drain(self._embeddings, self._embedding_codec, self.name):
            try:
                rows = self._embedding_rows(message, frames[1:])
            except ValueError as exc:  # DecodeError included
                logger.warning("%s dropped a malformed embedding: %s", self.name, exc)
                continue
            if isinstance(rows, str):
                errors.append(self._fail_images(message.request_id, rows))
            else:
                self._mm_inbox.add_embedding(message.request_id, message.content_hash, rows)
            if not self._mm_inbox.has_room:
                break
        return errors

    def _transfer_images(self, transfer: KVTransfer, frames: list) -> MultiModalInputs:
        """Decode side: a transfer's image embeddings (one frame each, after its header) as engine inputs."""
        if len(frames) != len(transfer.images):
            raise ValueError(f"{len(transfer.images)} images but {len(frames)} embedding frames")
        hidden, dtype_name = self.engine.runner.model.spec.hidden_size, _dtype_name(self.engine.runner.dtype)
        rows = [rows_from_frame(frame, ref.length, hidden, dtype_name) for ref, frame in zip(transfer.images, frames)]
        return self._mm_inbox.inputs(transfer.prompt_token_ids, transfer.images, rows)

    def _embedding_rows(self, message: ImageEmbedding, frames: list) -> torch.Tensor | str:
        """The rows an ImageEmbedding carries (checked against its header), or the encoder's error."""
        if message.error is not None:
            return message.error
        # the runner's dtype by its canonical name ("bfloat16"), as encoders send it (config may say "bf16")
        if len(frames) != 1 or message.dtype != _dtype_name(self.engine.runner.dtype):
            raise ValueError(f"embedding of {message.request_id} has {len(frames)} frames, dtype {message.dtype}")
        return embedding_from_frame(message, frames[0])

    def _admit_images(self) -> list[RequestError]:
        """Encode what this worker was asked to (colocated), then start requests whose images are all in."""
        errors = []
        if self._to_encode:
            work, self._to_encode = self._to_encode, []
            if self.image_encoder is None:  # a worker of a text model, or a prefill worker: not its job
                results = ["this worker does not encode images"] * len(work)
            else:
                results = self.image_encoder.encode([(request.image, data) for request, data in work])
            for (request, _), result in zip(work, results):
                if isinstance(result, str):
                    errors.append(self._fail_images(request.request_id, result))
                else:
                    self._mm_inbox.add_embedding(request.request_id, request.image.content_hash, result)
        for message, multi_modal in self._mm_inbox.take_ready():
            error = self._add(message, multi_modal)
            if error is not None:
                errors.append(error)
        for message in self._mm_inbox.expire():
            errors.append(RequestError(request_id=message.request_id, message="the request's image embeddings "
                                       "did not arrive in time; retry", type="service_unavailable", status=503))
        return errors

    def _fail_images(self, request_id: str, reason: str) -> RequestError:
        """Fail a request whose image could not be encoded (now, or when its GenerateRequest arrives)."""
        self._mm_inbox.drop(request_id)
        if request_id not in self._reply_to:
            self._image_failures[request_id] = reason
        return RequestError(request_id=request_id, message=f"an image could not be encoded: {reason}")

    def _receive_kv(self) -> list[RequestError]:
        assert self._receiver is not None
        try:
            completed, resumes = self._receiver.receive()
        except DecodeError as exc:
            logger.warning("%s dropped a malformed KV message: %s", self.name, exc)
            return []
        for transfer in completed:
            self._track_reply(transfer.request_id, transfer.reply_to, transfer.sampling)
        errors = []
        for resume in resumes:  # recompute here: the stream continues after the tokens already sent
            t = resume.transfer
            self.transfer_stats.fallbacks += 1
            logger.warning("%s recomputes %s: %s", self.name, t.request_id, resume.reason)
            request = GenerateRequest(request_id=t.request_id, prompt_token_ids=t.prompt_token_ids,
                                      sampling=t.sampling, reply_to=t.reply_to, cache_salt=t.cache_salt,
                                      output_token_ids=t.output_token_ids, images=t.images)
            self._track_reply(t.request_id, t.reply_to, t.sampling)
            error = self._add(request, resume.multi_modal)
            if error is not None:
                errors.append(error)
        return errors

    def _track_reply(self, request_id: str, reply_to: str, sampling: SamplingSpec) -> None:
        self._reply_to[request_id] = reply_to
        if sampling.logprobs is not None:
            self._num_logprobs[request_id] = sampling.logprobs

    def _handle(self, message: GenerateRequest | AbortRequest | KVAck) -> RequestError | None:
        if isinstance(message, KVAck):
            self._sender.on_ack(message)
            return None
        if isinstance(message, AbortRequest):
            if self._receiver is not None:  # first: it waits for copies still writing the request's blocks
                self._receiver.abort(message.request_id)
            self.engine.abort_request(message.request_id)
            self._mm_inbox.drop(message.request_id)
            self._forget_handoff(message.request_id)
            self._forget(message.request_id)
            return None
        self._track_reply(message.request_id, message.reply_to, message.sampling)
        if message.images:  # it starts once its images' embeddings are in (_admit_images)
            reason = self._image_failures.pop(message.request_id, None)
            if reason is not None:
                return RequestError(request_id=message.request_id, message=f"an image could not be encoded: {reason}")
            if self.engine.vision_language is None:
                return RequestError(request_id=message.request_id, message="this model is text-only and does "
                                    "not accept image input", param="messages")
            self._mm_inbox.park(message)
            return None
        return self._add(message)

    def _add(self, message: GenerateRequest, multi_modal: MultiModalInputs | None = None) -> RequestError | None:
        try:
            params = sampling_params(message.sampling)
            # prefill only: the first token here, the rest on the decode worker
            prefill_only = message.kv_target is not None and params.n == 1 and params.max_tokens != 1
            if prefill_only:
                self._handoffs[message.request_id] = message
                if multi_modal is not None:
                    self._handoff_mm[message.request_id] = multi_modal
            self.engine.add_request(message.request_id, message.prompt_token_ids, params,
                                    cache_salt=message.cache_salt, hold_kv=prefill_only,
                                    output_token_ids=message.output_token_ids, prefill_only=prefill_only,
                                    multi_modal=multi_modal)
        except InvalidRequestError as exc:
            self._forget_handoff(message.request_id)
            return RequestError(request_id=message.request_id, message=exc.message, param=exc.param)
        except Exception as exc:  # a bug must not take the worker down
            self._forget_handoff(message.request_id)
            logger.error("%s could not add %s: %s", self.name, message.request_id, traceback.format_exc())
            return RequestError(request_id=message.request_id, message=f"internal error: {exc}",
                                type="internal_error", status=500)
        return None

    def _forget_handoff(self, request_id: str) -> None:
        self._handoffs.pop(request_id, None)
        self._handoff_mm.pop(request_id, None)

    # ------------------------------------------------------------------ step

    def _step(self) -> list[RequestDelta | RequestError]:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.error("%s step failed: %s", self.name, traceback.format_exc())
            return self._fail_all(f"internal error in the engine step: {exc}")
        self.num_steps += 1
        return [to_delta(out, self._num_logprobs.get(out.request_id, 0)) for out in outputs]

    def _hand_off(self, items: list[RequestDelta | RequestError],
                  shipments: list[tuple[GenerateRequest, list[int]]]) -> list[RequestDelta | RequestError]:
        """Prefill: a request that reached its first token streams it unfinished; its KV is queued to ship."""
        for item in items:
            message = self._handoffs.get(item.request_id)
            if message is None or isinstance(item, RequestError) or not item.finished:
                continue
            del self._handoffs[item.request_id]
            completion = item.completions[0]
            if completion.finish_reason != "length":  # a real stop (EOS, stop token or string): done here
                self.engine.release_kv(item.request_id)
                self._handoff_mm.pop(item.request_id, None)
                continue
            item.finished, completion.finish_reason = False, None
            shipments.append((message, completion.token_ids))
        return items

    def _ship(self, message: GenerateRequest, first_tokens: list[int]) -> None:
        assert message.kv_target is not None
        transfer = KVTransfer(request_id=message.request_id, layout=self._sender.layout,
                              prompt_token_ids=message.prompt_token_ids,
                              output_token_ids=list(message.output_token_ids) + list(first_tokens),
                              sampling=message.sampling, reply_to=message.reply_to, ack_to=self.input_address,
                              cache_salt=message.cache_salt, images=message.images)
        multi_modal = self._handoff_mm.pop(message.request_id, None)
        # the images' embeddings go along: the decode worker keys its blocks by them and recomputes with them
        embeddings = [embedding_frame(f.embeddings)[1] for f in multi_modal.features] if multi_modal is not None else []
        try:
            self._sender.send(transfer, message.kv_target, embeddings)
        except Exception:  # the decode worker will time out and recompute; free our blocks now
            logger.error("%s could not send the KV of %s: %s", self.name, message.request_id, traceback.format_exc())
            self.transfer_stats.failures += 1
            self._sender.cancel(message.request_id)

    def _fail_all(self, message: str) -> list[RequestError]:
        errors = []
        for request_id in list(self._reply_to):
            self.engine.abort_request(request_id)
            errors.append(RequestError(request_id=request_id, message=message, type="internal_error", status=500))
        return errors

    # ------------------------------------------------------------------ send

    def _send(self, items: list[RequestDelta | RequestError]) -> None:
        by_gateway: dict[str, list[RequestDelta | RequestError]] = defaultdict(list)
        for item in items:
            finished = isinstance(item, RequestError) or item.finished
            reply_to = self._reply_to.get(item.request_id)
            if finished:
                self._forget(item.request_id)
            if reply_to is not None:
                by_gateway[reply_to].append(item)
        for reply_to, batch in by_gateway.items():
            self._output(reply_to).send_multipart(self._outbound.encode(OutputBatch(items=batch, worker=self.name)), copy=False)

    def _forget(self, request_id: str) -> None:
        self._reply_to.pop(request_id, None)
        self._num_logprobs.pop(request_id, None)

    def _output(self, address: str) -> zmq.Socket:
        socket = self._outputs.get(address)
        if socket is None:
            socket = configure(self._context.socket(zmq.PUSH))
            socket.connect(address)
            self._outputs[address] = socket
        return socket

    def _close(self) -> None:
        self._sender.close()
        if self._staging is not None:
            self._staging.close()
        sockets = [self._input, *self._outputs.values()]
        if self._embeddings is not None:
            sockets.append(self._embeddings)
        if self._receiver is not None:
            self._receiver.close()
            sockets.append(self._receiver.socket)
        for socket in sockets:
            socket.close(linger=0)
        self._context.term()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _open_staging(capacity_bytes: int, pin: bool) -> StagingBuffer | None:
    """The prefill staging buffer, or None (KV then goes the plain way) when it is off or cannot be had."""
    if capacity_bytes <= 0:
        return None
    try:
        return StagingBuffer(capacity_bytes, pin=pin)
    except OSError as exc:  # e.g. a container's small /dev/shm
        logger.warning("no KV staging buffer of %d bytes (%s); KV goes through plain host copies", capacity_bytes, exc)
        return None


def to_delta(output: RequestOutput, num_top_logprobs: int = 0) -> RequestDelta:
    completions = [_completion_delta(c, num_top_logprobs) for c in output.outputs if c.delta_token_ids or c.finished]
    return RequestDelta(request_id=output.request_id, completions=completions, finished=output.finished,
                        num_prompt_tokens=len(output.prompt_token_ids), num_cached_tokens=output.num_cached_tokens)


def _completion_delta(c: CompletionOutput, num_top: int) -> CompletionDelta:
    logprobs = None
    if c.delta_logprobs is not None:
        logprobs = [_position(token_id, entry, num_top)
                    for token_id, entry in zip(c.delta_token_ids, c.delta_logprobs)]
    return CompletionDelta(index=c.index, token_ids=c.delta_token_ids, text=c.delta_text,
                           start_index=len(c.token_ids) - len(c.delta_token_ids), logprobs=logprobs,
                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def _position(token_id: int, entry: dict[int, Logprob], num_top: int) -> PositionLogprobs:
    def item(tid: int) -> TokenLogprob:
        return TokenLogprob(tid, entry[tid].decoded_token or "", entry[tid].logprob)

    # the entry holds the top-k plus the sampled token; a sampled token outside the top-k ranks last
    top = sorted(entry, key=lambda tid: entry[tid].rank)[:num_top]
    return PositionLogprobs(sampled=item(token_id), top=[item(tid) for tid in top])
