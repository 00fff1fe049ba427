"""A worker's heartbeat: receive requests over ZeroMQ, step the engine, send token deltas back.

    loop:  receive (block only when idle) -> engine.step() -> send one OutputBatch per gateway

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

import zmq

from services.common.channels import bind, configure
from services.common.codec import DecodeError, MessageCodec
from services.common.errors import InvalidRequestError
from services.common.messages import (AbortRequest, CompletionDelta, GenerateRequest, OutputBatch, PositionLogprobs,
                                      RequestDelta, RequestError, TokenLogprob, WorkerInbound)
from services.engine import LLMEngine, SamplingParams
from services.engine.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50  # how long an idle loop waits for a request before checking for shutdown


class EngineWorker:
    def __init__(self, engine: LLMEngine, input_address: str, name: str = "worker-0") -> None:
        self.engine = engine
        self.name = name
        self._context = zmq.Context()
        self._input = configure(self._context.socket(zmq.PULL))
        self.input_address = bind(self._input, input_address)
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
            errors = self._receive(block=not self.engine.has_unfinished_requests())
            items: list[RequestDelta | RequestError] = list(errors)
            if self.engine.has_unfinished_requests():
                items += self._step()
            self._send(items)
        self._close()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ receive

    def _receive(self, block: bool) -> list[RequestError]:
        errors = []
        if block and not self._input.poll(IDLE_POLL_MS):
            return errors
        while True:
            try:
                frames = self._input.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return errors
            try:
                message = self._inbound.decode(frames)
            except DecodeError as exc:
                logger.warning("%s dropped a malformed message: %s", self.name, exc)
                continue
            error = self._handle(message)
            if error is not None:
                errors.append(error)

    def _handle(self, message: GenerateRequest | AbortRequest) -> RequestError | None:
        if isinstance(message, AbortRequest):
            self.engine.abort_request(message.request_id)
            self._forget(message.request_id)
            return None
        self._reply_to[message.request_id] = message.reply_to
        if message.sampling.logprobs is not None:
            self._num_logprobs[message.request_id] = message.sampling.logprobs
        try:
            params = SamplingParams(**{f: getattr(message.sampling, f) for f in message.sampling.__struct_fields__})
            self.engine.add_request(message.request_id, message.prompt_token_ids, params,
                                    cache_salt=message.cache_salt)
        except InvalidRequestError as exc:
            return RequestError(request_id=message.request_id, message=exc.message, param=exc.param)
        except Exception as exc:  # a bug must not take the worker down
            logger.error("%s could not add %s: %s", self.name, message.request_id, traceback.format_exc())
            return RequestError(request_id=message.request_id, message=f"internal error: {exc}",
                                type="internal_error", status=500)
        return None

    # ------------------------------------------------------------------ step

    def _step(self) -> list[RequestDelta | RequestError]:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.error("%s step failed: %s", self.name, traceback.format_exc())
            return self._fail_all(f"internal error in the engine step: {exc}")
        self.num_steps += 1
        return [to_delta(out, self._num_logprobs.get(out.request_id, 0)) for out in outputs]

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
            self._output(reply_to).send_multipart(self._outbound.encode(OutputBatch(items=batch)), copy=False)

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
        for socket in [self._input, *self._outputs.values()]:
            socket.close(linger=0)
        self._context.term()


def to_delta(output: RequestOutput, num_top_logprobs: int = 0) -> RequestDelta:
    completions = [_completion_delta(c, num_top_logprobs) for c in output.outputs if c.delta_token_ids or c.finished]
    return RequestDelta(request_id=output.request_id, completions=completions, finished=output.finished,
                        num_prompt_tokens=len(output.prompt_token_ids), num_cached_tokens=output.num_cached_tokens)


def _completion_delta(c: CompletionOutput, num_top: int) -> CompletionDelta:
    logprobs = None
    if c.delta_logprobs is not None:
        logprobs = [_position(token_id, entry, num_top)
                    for token_id, entry in zip(c.delta_token_ids, c.delta_logprobs)]
    return CompletionDelta(index=c.index, token_ids=c.delta_token_ids, text=c.delta_text, logprobs=logprobs,
                           finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def _position(token_id: int, entry: dict[int, Logprob], num_top: int) -> PositionLogprobs:
    def item(tid: int) -> TokenLogprob:
        return TokenLogprob(tid, entry[tid].decoded_token or "", entry[tid].logprob)

    # the entry holds the top-k plus the sampled token; a sampled token outside the top-k ranks last
    top = sorted(entry, key=lambda tid: entry[tid].rank)[:num_top]
    return PositionLogprobs(sampled=item(token_id), top=[item(tid) for tid in top])
