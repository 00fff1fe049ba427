"""ClusterBackend with a worker down: /ready means "can serve", a missing stage is served whole by the
survivors, and a request sent to a worker in the window before the health check notices is migrated.

Real ZeroMQ over loopback, no Ray: each worker is a PULL socket the test reads, and its actor a fake
whose info() answers or raises, as Ray does for a live or dead actor."""

import asyncio
import contextlib
import time

import zmq
import zmq.asyncio

from services.common.channels import bind, tcp_address
from services.common.codec import MessageCodec
from services.common.messages import (
    AbortRequest,
    CompletionDelta,
    GenerateRequest,
    OutputBatch,
    RequestDelta,
    SamplingSpec,
    WorkerInbound,
)
from services.gateway.cluster import STATE_STALE_S, ClusterBackend
from services.workers.pool import WorkerHandle
from tests.unit.cluster_fakes import FakeActor, fake_info


class FakeWorker:
    def __init__(self, context: zmq.asyncio.Context, name: str, stage: str) -> None:
        self.inbox = context.socket(zmq.PULL)
        address = bind(self.inbox, tcp_address())
        # nobody publishes on the state address: the stream stays silent
        info = fake_info(name, stage, address, tcp_address(port=1), address if stage == "decode" else None)
        self.actor = FakeActor(info)
        self.handle = WorkerHandle(name, stage, self.actor, info)
        self._codec = MessageCodec(WorkerInbound)

    async def receive(self):
        return self._codec.decode(await asyncio.wait_for(self.inbox.recv_multipart(), 5))


def _link(backend, name):
    return next(link for link in backend._links if link.handle.name == name)


def _request(backend, request_id, max_tokens=4):
    return backend.generate(request_id, list(range(10, 22)), SamplingSpec(max_tokens=max_tokens, temperature=0.0))


def _finish(request_id, worker, start_index):
    completion = CompletionDelta(index=0, token_ids=[7], text="x", start_index=start_index, finish_reason="length")
    return OutputBatch(
        worker=worker,
        items=[RequestDelta(request_id=request_id, completions=[completion], finished=True, num_prompt_tokens=12)],
    )


def test_a_missing_stage_is_served_whole_and_ready_means_some_engine_worker_is_up():
    async def scenario():
        context = zmq.asyncio.Context()
        prefill, decode = FakeWorker(context, "prefill-0", "prefill"), FakeWorker(context, "decode-0", "decode")
        encode = FakeWorker(context, "encode-0", "encode")
        workers = [prefill.handle, decode.handle, encode.handle]
        # the health loop checks once at start (all alive); the test runs every later check itself
        backend = ClusterBackend(workers, model_name="m", tokenizer=None, health_interval_s=3600)
        await backend.start()
        await asyncio.sleep(0.1)
        replies = MessageCodec(OutputBatch)
        to_gateway = context.socket(zmq.PUSH)
        to_gateway.connect(backend.reply_to)
        try:
            assert backend.is_ready()

            # the prefill worker dies: a request sent to it before the health check notices is not lost
            prefill.actor.alive = False
            first = _request(backend, "r1")
            pending = asyncio.ensure_future(first.__anext__())
            sent = await prefill.receive()
            assert isinstance(sent, GenerateRequest) and sent.kv_target.worker == "decode-0"
            await backend._check(_link(backend, "prefill-0"))
            assert isinstance(await decode.receive(), AbortRequest)  # the survivor drops its part
            resumed = await decode.receive()  # ... and serves it whole
            assert (resumed.request_id, resumed.kv_target, resumed.output_token_ids) == ("r1", None, [])
            # a stopped (not dead) prefill worker that comes back finds the request aborted
            assert await prefill.receive() == AbortRequest(request_id="r1")
            await to_gateway.send_multipart(replies.encode(_finish("r1", "decode-0", 0)))
            assert (await pending).finished and backend.num_migrations == 1

            # a whole stage down: still ready, and new requests go whole to the decode worker
            assert backend.is_ready()
            second = _request(backend, "r2")
            pending = asyncio.ensure_future(second.__anext__())
            whole = await decode.receive()
            assert (whole.request_id, whole.kv_target) == ("r2", None)
            await to_gateway.send_multipart(replies.encode(_finish("r2", "decode-0", 0)))
            assert (await pending).finished
            assert backend.cluster_stats().decisions[("preble", "fallback_whole")] == 1

            # no engine worker left (an encoder alone cannot serve): not ready
            decode.actor.alive = False
            await backend._check(_link(backend, "decode-0"))
            assert not backend.is_ready()

            # both back: disaggregated placement again
            prefill.actor.alive = decode.actor.alive = True
            await backend._check(_link(backend, "prefill-0"))
            await backend._check(_link(backend, "decode-0"))
            assert backend.is_ready()
            third = _request(backend, "r3")
            pending = asyncio.ensure_future(third.__anext__())
            split = await prefill.receive()
            assert (split.request_id, split.kv_target.worker) == ("r3", "decode-0")
            pending.cancel()  # the client goes away: both workers are told
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            assert await prefill.receive() == await decode.receive() == AbortRequest(request_id="r3")
        finally:
            await backend.close()
            to_gateway.close(linger=0)
            for worker in (prefill, decode, encode):
                worker.inbox.close(linger=0)
            context.term()

    asyncio.run(scenario())


def test_a_quiet_worker_is_skipped_before_the_health_check_decides():
    async def scenario():
        context = zmq.asyncio.Context()
        prefill, decode = FakeWorker(context, "prefill-0", "prefill"), FakeWorker(context, "decode-0", "decode")
        backend = ClusterBackend(
            [prefill.handle, decode.handle], model_name="m", tokenizer=None, health_interval_s=3600
        )
        await backend.start()
        await asyncio.sleep(0.1)
        try:
            # stopped: no state message ever, and no answer to info() for longer than STATE_STALE_S
            _link(backend, "prefill-0").last_info_at = time.monotonic() - STATE_STALE_S - 1
            request = _request(backend, "r1")
            pending = asyncio.ensure_future(request.__anext__())
            whole = await decode.receive()
            assert (whole.request_id, whole.kv_target) == ("r1", None) and backend.router.suspended == {"prefill-0"}
            assert _link(backend, "prefill-0").alive and backend.is_ready()
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            assert await decode.receive() == AbortRequest(request_id="r1")

            await backend._check(_link(backend, "prefill-0"))  # it answers again
            request = _request(backend, "r2")
            pending = asyncio.ensure_future(request.__anext__())
            split = await prefill.receive()
            assert (split.request_id, split.kv_target.worker) == ("r2", "decode-0") and not backend.router.suspended
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        finally:
            await backend.close()
            for worker in (prefill, decode):
                worker.inbox.close(linger=0)
            context.term()

    asyncio.run(scenario())
