"""Prefill and decode workers over real ZeroMQ sockets on loopback (no Ray): the KV moves between
two engines, the output equals colocated output, and failed transfers fall back to recomputation."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from services.common.channels import bind, configure
from services.common.codec import MessageCodec
from services.common.messages import (
    DataPlanePeers,
    GenerateRequest,
    KVTarget,
    KVTransfer,
    OutputBatch,
    RequestError,
    SamplingSpec,
    WorkerInbound,
)
from services.engine import LLMEngine, SamplingParams
from services.workers.engine_worker import EngineWorker
from services.workers.kv_receiver import KVReceiver
from services.workers.kv_sender import KVSender
from services.workers.kv_staging import StagingBuffer
from services.workers.kv_transfer import engine_layout

ENGINE = dict(block_size=8, num_kv_blocks=96, max_num_batched_tokens=32)


def make_engine(model_dir):
    return LLMEngine(model=model_dir, **ENGINE)


def colocated(model_dir, prompts, max_tokens):
    engine = make_engine(model_dir)
    outputs = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    return [outputs[str(i)] for i in range(len(prompts))]


class Cluster:
    """One prefill worker, one decode worker, and the gateway's sockets."""

    def __init__(self, model_dir, kv_timeout_s=10.0, kv_lease_s=30.0, delivery="shared memory", staging_bytes=None):
        self.prefill_engine, self.decode_engine = make_engine(model_dir), make_engine(model_dir)
        self.prefill = EngineWorker(
            self.prefill_engine,
            "tcp://127.0.0.1:0",
            "prefill-0",
            role="prefill",
            kv_lease_s=kv_lease_s,
            kv_staging_bytes=0 if delivery == "plain" else staging_bytes,
        )
        self.decode = EngineWorker(
            self.decode_engine, "tcp://127.0.0.1:0", "decode-0", role="decode", kv_timeout_s=kv_timeout_s
        )
        self.threads = [threading.Thread(target=w.run, daemon=True) for w in (self.prefill, self.decode)]
        for t in self.threads:
            t.start()
        self.ctx = zmq.Context()
        self.results = configure(self.ctx.socket(zmq.PULL))
        self.reply_to = bind(self.results, "tcp://127.0.0.1:0")
        peers = DataPlanePeers(  # as the gateway registers them over Ray
            reply_address=self.reply_to,
            input_addresses=[self.prefill.input_address, self.decode.input_address],
            kv_addresses=[self.decode.kv_address],
        )
        for worker in (self.prefill, self.decode):
            worker.peers.register(peers)
        self.to_prefill = configure(self.ctx.socket(zmq.PUSH))
        self.to_prefill.connect(self.prefill.input_address)
        # frames: the decode worker looks like another host's, so the bytes cross the socket
        host_id = self.decode.host_id if delivery == "shared memory" else "another-host"
        self.target = KVTarget(worker="decode-0", kv_address=self.decode.kv_address, host_id=host_id)

    def generate(self, prompts, max_tokens):
        codec = MessageCodec(WorkerInbound)
        target = self.target
        for i, p in enumerate(prompts):
            spec = SamplingSpec(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            self.to_prefill.send_multipart(
                codec.encode(
                    GenerateRequest(
                        request_id=str(i), prompt_token_ids=p, sampling=spec, reply_to=self.reply_to, kv_target=target
                    )
                )
            )
        tokens = {str(i): [] for i in range(len(prompts))}
        done: set[str] = set()
        outputs = MessageCodec(OutputBatch)
        while len(done) < len(prompts):
            assert self.results.poll(30000), "no output"
            for item in outputs.decode(self.results.recv_multipart()).items:
                assert not isinstance(item, RequestError), item
                for c in item.completions:
                    tokens[item.request_id] += c.token_ids
                if item.finished:
                    done.add(item.request_id)
        return [tokens[str(i)] for i in range(len(prompts))]

    def wait_idle(self, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(
                e.num_free_blocks() == e.num_usable_blocks() and not e.has_unfinished_requests()
                for e in (self.prefill_engine, self.decode_engine)
            ):
                return True
            time.sleep(0.05)
        return False

    def close(self):
        for w in (self.prefill, self.decode):
            w.stop()
        for t in self.threads:
            t.join(5)
        self.results.close()
        self.to_prefill.close()
        self.ctx.term()


def prompts_with_shared_prefix():
    shared = list(range(100, 124))
    return [list(range(10, 13)), shared + [5, 6, 7], shared + list(range(300, 341)), list(range(500, 517))]


DELIVERIES = ["shared memory", "frames", "plain"]  # see services.workers.kv_transfer


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_disaggregated_output_equals_colocated(llama_dir, delivery):
    prompts = prompts_with_shared_prefix()
    cluster = Cluster(llama_dir, delivery=delivery)
    try:
        assert cluster.generate(prompts, max_tokens=10) == colocated(llama_dir, prompts, 10)
        assert cluster.wait_idle(), "blocks leaked on a worker"
        stats = cluster.prefill.transfer_stats
        assert stats.transfers_completed == len(prompts) and stats.failures == 0
        assert cluster.decode.transfer_stats.bytes_received == stats.bytes_sent > 0
        staging = cluster.prefill.prefill_role.staging
        assert staging is None if delivery == "plain" else staging.allocator.num_regions == 0
    finally:
        cluster.close()


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_the_kv_decode_receives_equals_what_prefill_computed(llama_dir, delivery):
    prefill, decode = make_engine(llama_dir), make_engine(llama_dir)
    prompt = list(range(40, 77))
    prefill.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
    while prefill.has_unfinished_requests():
        first = [o for o in prefill.step() if o.finished]
    layout = engine_layout(prefill, "m")
    computed = [prefill.export_kv("r", layer).clone() for layer in range(layout.num_layers)]
    ctx = zmq.Context()
    pull = configure(ctx.socket(zmq.PULL), 2**30)
    address = bind(pull, "tcp://127.0.0.1:0")
    acks = configure(ctx.socket(zmq.PULL))
    ack_to = bind(acks, "tcp://127.0.0.1:0")
    staging = None if delivery == "plain" else StagingBuffer(2**20, pin=False)
    sender = KVSender(prefill, ctx, layout, ack_to=ack_to, staging=staging, host_id="h")
    receiver = KVReceiver(decode, ctx, pull, layout)
    request = GenerateRequest(
        request_id="r",
        prompt_token_ids=prompt,
        sampling=SamplingSpec(temperature=0, max_tokens=5),
        reply_to="",
        output_token_ids=first[0].outputs[0].token_ids,
    )
    transfer = KVTransfer(request=request, layout=layout, ack_to=ack_to)
    try:
        sender.send(
            transfer, KVTarget(worker="d", kv_address=address, host_id="h" if delivery == "shared memory" else "other")
        )
        if staging is not None:  # staged: prefill's blocks are free before the ack
            assert prefill.num_free_blocks() == prefill.num_usable_blocks()
        completed = []
        for _ in range(100):
            done, resumes = receiver.receive()
            assert not resumes
            completed += done
            if completed:
                break
            time.sleep(0.02)
        assert [t.request_id for t in completed] == ["r"]
        for layer in range(layout.num_layers):
            assert torch.equal(decode.export_kv("r", layer), computed[layer])
        assert acks.poll(5000)
        sender.on_ack(MessageCodec(WorkerInbound).decode(acks.recv_multipart()))
        assert sender.num_leases == 0 and prefill.num_free_blocks() == prefill.num_usable_blocks()
        assert staging is None or staging.allocator.num_taken_bytes == 0
    finally:
        sender.close()
        receiver.close()
        if staging is not None:
            staging.close()
        for socket in (pull, acks):
            socket.close()
        ctx.term()


def test_a_decode_worker_that_cannot_read_the_staging_file_is_sent_frames_from_then_on(llama_dir):
    cluster = Cluster(llama_dir)
    cluster.target = KVTarget(worker="decode-0", kv_address=cluster.decode.kv_address, host_id=cluster.prefill.host_id)
    cluster.decode.decode_role.receiver.staging.view = _unreadable  # as if the file lived in another /dev/shm
    prompts = prompts_with_shared_prefix()
    try:
        assert cluster.generate(prompts[:1], max_tokens=6) == colocated(llama_dir, prompts[:1], 6)
        assert cluster.decode.transfer_stats.fallbacks == 1  # the first request is recomputed
        assert cluster.generate(prompts[1:], max_tokens=6) == colocated(llama_dir, prompts[1:], 6)
        assert cluster.decode.transfer_stats.fallbacks == 1  # the rest travel as frames
        assert cluster.prefill.transfer_stats.transfers_completed == len(prompts) - 1
        assert cluster.wait_idle(), "blocks leaked after the fallback"
    finally:
        cluster.close()


@pytest.mark.parametrize("delivery", DELIVERIES)
def test_kv_bytes_are_counted_at_both_ends_by_path(llama_dir, delivery):
    cluster = Cluster(llama_dir, delivery=delivery)
    try:
        cluster.generate(prompts_with_shared_prefix()[:2], max_tokens=4)
        sent, received = cluster.prefill.transfer_stats, cluster.decode.transfer_stats
        assert received.bytes_received == sent.bytes_sent > 0
        shared_bytes = sent.bytes_sent if delivery == "shared memory" else 0
        assert sent.bytes_sent_shared_memory == received.bytes_received_shared_memory == shared_bytes
    finally:
        cluster.close()


def test_transfers_that_find_the_staging_buffer_full_wait_for_room_and_never_take_the_plain_path(llama_dir):
    prompts = [list(range(10 + 50 * i, 50 + 50 * i)) for i in range(4)]  # 40 tokens each
    layout = engine_layout(make_engine(llama_dir), "m")
    num_blocks = -(-40 // layout.block_size)
    one_request = 2 * num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim * 4 * layout.num_layers
    cluster = Cluster(llama_dir, staging_bytes=one_request)  # room for one request's KV at a time
    try:
        assert cluster.generate(prompts, max_tokens=5) == colocated(llama_dir, prompts, 5)
        sent = cluster.prefill.transfer_stats
        assert sent.staging_waits >= 1 and sent.transfers_completed == len(prompts)
        assert sent.bytes_sent_shared_memory == sent.bytes_sent > 0  # every byte staged, none sent the plain way
        assert cluster.wait_idle(), "blocks leaked"
        assert cluster.prefill.prefill_role.sender.num_leases == 0
        assert cluster.prefill.prefill_role.staging.allocator.num_taken_bytes == 0
    finally:
        cluster.close()


def _unreadable(name, offset, nbytes):
    raise ValueError(f"staging buffer {name} is not on this host")


def test_a_transfer_that_never_completes_is_recomputed_and_frees_everything(llama_dir):
    prompts = prompts_with_shared_prefix()[:2]
    cluster = Cluster(llama_dir, kv_timeout_s=0.5, kv_lease_s=1.0)
    sender = cluster.prefill.prefill_role.sender
    sender._send_ready = lambda: None  # injected fault: the staged layers never leave the prefill worker
    try:
        assert cluster.generate(prompts, max_tokens=8) == colocated(llama_dir, prompts, 8)
        assert cluster.decode.transfer_stats.fallbacks == 2
        assert cluster.wait_idle(), "blocks leaked after the fallback"
        deadline = time.monotonic() + 5  # the lease ends, and with it the staging regions
        while sender.num_leases and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.num_leases == 0 and cluster.prefill.prefill_role.staging.allocator.num_taken_bytes == 0
    finally:
        cluster.close()


@pytest.mark.parametrize("mode", ["real stop", "max_tokens 1"])
def test_requests_that_end_at_their_first_token_never_transfer(llama_dir, mode):
    cluster = Cluster(llama_dir)
    try:
        max_tokens = 1 if mode == "max_tokens 1" else 4
        if mode == "real stop":  # greedy's first token is a stop token: the request ends on prefill
            first = colocated(llama_dir, [list(range(60, 70))], 1)[0][0]
            spec = SamplingSpec(temperature=0, max_tokens=max_tokens, stop_token_ids=[first])
        else:
            spec = SamplingSpec(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        codec = MessageCodec(WorkerInbound)
        cluster.to_prefill.send_multipart(
            codec.encode(
                GenerateRequest(
                    request_id="x",
                    prompt_token_ids=list(range(60, 70)),
                    sampling=spec,
                    reply_to=cluster.reply_to,
                    kv_target=KVTarget(worker="decode-0", kv_address=cluster.decode.kv_address),
                )
            )
        )
        assert cluster.results.poll(30000)
        (delta,) = MessageCodec(OutputBatch).decode(cluster.results.recv_multipart()).items
        assert delta.finished and len(delta.completions[0].token_ids) == 1
        assert cluster.wait_idle()
        assert cluster.prefill.transfer_stats.bytes_sent == 0
    finally:
        cluster.close()
