"""Workers connect only to addresses registered over Ray (services.workers.peers), speak CURVE when the
cluster has keys, and size each receiving socket to its messages. Real workers and sockets over loopback
(no Ray): a forged message naming an unregistered address is dropped, counted, and never connected to."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import zmq

from services.common.channels import bind, configure, connect
from services.common.codec import MAX_HEADER_BYTES, MessageCodec
from services.common.messages import (
    DataPlanePeers,
    EncodeRequest,
    EncoderInbound,
    GenerateRequest,
    ImageRef,
    KVInbound,
    KVLayers,
    KVTarget,
    KVTransfer,
    OutputBatch,
    SamplingSpec,
    WorkerInbound,
)
from services.common.security import ClusterSecret, ZapAuthenticator, derive_keys
from services.engine import LLMEngine
from services.workers.encode_worker import EncodeWorker
from services.workers.engine_worker import EngineWorker
from services.workers.kv_transfer import LAYERS_PER_MESSAGE, engine_layout, max_kv_frame_bytes
from services.workers.peers import PeerRegistry

ENGINE = dict(block_size=8, num_kv_blocks=64)
SPEC = SamplingSpec(temperature=0, max_tokens=4, ignore_eos=True)
SETTLE_S = 0.5  # longer than a loopback connection (and its handshake) takes to be accepted


# ----------------------------------------------------------------------------------------------
# The registry


def test_each_gateway_replaces_its_own_registration_and_the_union_is_allowed():
    registry = PeerRegistry("w")
    registry.register(DataPlanePeers(reply_address="tcp://a:1", input_addresses=["tcp://p:1"]))
    registry.register(DataPlanePeers(reply_address="tcp://b:1", kv_addresses=["tcp://d:1"]))
    assert registry.allows("reply", "tcp://a:1") and registry.allows("reply", "tcp://b:1")
    assert registry.allows("ack", "tcp://p:1") and registry.allows("kv", "tcp://d:1")
    assert not registry.allows("kv", "tcp://p:1")  # an address counts only for its own kind
    # gateway a sees the prefill worker restarted at a new address: the old one is no longer allowed
    registry.register(DataPlanePeers(reply_address="tcp://a:1", input_addresses=["tcp://p:2"]))
    assert registry.allows("ack", "tcp://p:2") and not registry.allows("ack", "tcp://p:1")
    registry.unregister("tcp://b:1")
    assert not registry.allows("reply", "tcp://b:1") and not registry.allows("kv", "tcp://d:1")
    assert registry.num_refused == 4


def test_registrations_of_gateways_long_gone_are_forgotten_oldest_first():
    registry = PeerRegistry("w", max_gateways=2)
    for name in "abc":
        registry.register(DataPlanePeers(reply_address=f"tcp://{name}:1"))
    assert not registry.allows("reply", "tcp://a:1")
    assert registry.allows("reply", "tcp://b:1") and registry.allows("reply", "tcp://c:1")


# ----------------------------------------------------------------------------------------------
# Forged messages on real workers


class Trap:
    """A socket at an address nobody registered, watching for any connection to it."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = configure(context.socket(zmq.PULL))
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED)
        self.address = bind(self.socket, "tcp://127.0.0.1:0")

    def was_connected(self) -> bool:
        return bool(self.monitor.poll(0))

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


class Worker:
    """An EngineWorker on its own thread, the gateway's results socket (registered), and a trap."""

    def __init__(self, llama_dir: str, role: str = "colocated", keys=None) -> None:
        self.engine = LLMEngine(model=llama_dir, **ENGINE)
        self.worker = EngineWorker(self.engine, "tcp://127.0.0.1:0", f"{role}-0", role=role, keys=keys)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.context = zmq.Context()
        self.authenticator = ZapAuthenticator(self.context, keys, "gateway") if keys is not None else None
        self.results = configure(self.context.socket(zmq.PULL))
        self.reply_to = bind(self.results, "tcp://127.0.0.1:0", keys)
        self.worker.peers.register(
            DataPlanePeers(reply_address=self.reply_to, input_addresses=[self.worker.input_address])
        )
        self.requests = connect(configure(self.context.socket(zmq.PUSH)), self.worker.input_address, keys)
        self.trap = Trap(self.context)

    def send(self, socket: zmq.Socket, message, codec: MessageCodec | None = None) -> None:
        socket.send_multipart((codec or MessageCodec(WorkerInbound)).encode(message))

    def wait_refused(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.worker.peers.num_refused < count:
            assert time.monotonic() < deadline, f"refused {self.worker.peers.num_refused}, expected {count}"
            time.sleep(0.02)
        time.sleep(SETTLE_S)  # a connection the worker had opened would have been accepted by now

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(5)
        for socket in (self.results, self.requests):
            socket.close(linger=0)
        self.trap.close()
        if self.authenticator is not None:
            self.authenticator.close()
        self.context.term()


@pytest.fixture
def make_worker(llama_dir):
    workers: list[Worker] = []

    def make(role: str = "colocated", keys=None) -> Worker:
        workers.append(Worker(llama_dir, role, keys))
        return workers[-1]

    yield make
    for worker in workers:
        worker.close()


def _request(request_id: str, reply_to: str, kv_target: KVTarget | None = None) -> GenerateRequest:
    prompt = list(range(10, 30))
    return GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=SPEC, reply_to=reply_to, kv_target=kv_target
    )


def test_a_request_with_an_unregistered_reply_to_is_dropped_without_connecting(make_worker):
    w = make_worker()
    w.send(w.requests, _request("forged", w.trap.address))
    w.wait_refused(1)
    assert not w.trap.was_connected() and w.worker._replies._sockets == {}
    assert not w.engine.has_unfinished_requests() and len(w.worker.requests) == 0
    # the worker goes on serving what the gateway it knows sends
    w.send(w.requests, _request("real", w.reply_to))
    assert w.results.poll(20000)
    assert MessageCodec(OutputBatch).decode(w.results.recv_multipart()).items[0].request_id == "real"
    assert w.worker.peers.num_refused == 1


def test_a_prefill_request_with_an_unregistered_kv_target_is_dropped_without_connecting(make_worker):
    w = make_worker("prefill")
    w.send(w.requests, _request("forged", w.reply_to, KVTarget(worker="decode-0", kv_address=w.trap.address)))
    w.wait_refused(1)
    assert not w.trap.was_connected() and w.worker.prefill_role.sender._sockets == {}
    assert not w.results.poll(0)  # not served either: nothing was admitted


@pytest.mark.parametrize("forged", ["ack_to", "reply_to"])
def test_a_kv_transfer_naming_an_unregistered_address_is_dropped_without_connecting(make_worker, forged):
    w = make_worker("decode")
    ack_to = w.trap.address if forged == "ack_to" else w.worker.input_address
    reply_to = w.trap.address if forged == "reply_to" else w.reply_to
    layout = engine_layout(w.engine, "model")
    transfer = KVTransfer(request=_request("forged", reply_to).resume_after([5]), layout=layout, ack_to=ack_to)
    kv = connect(configure(w.context.socket(zmq.PUSH)), w.worker.kv_address)
    codec = MessageCodec(KVInbound)
    try:
        w.send(kv, transfer, codec)
        # its layers after it are dropped with it (no early group kept, nothing written)
        w.send(kv, KVLayers(request_id="forged", layer_start=0, layer_end=1, num_blocks=3), codec)
        w.wait_refused(1)
        receiver = w.worker.decode_role.receiver
        assert not w.trap.was_connected() and receiver._acks == {} and w.worker._replies._sockets == {}
        assert receiver.num_pending == 0 and w.engine.num_free_blocks() == w.engine.num_usable_blocks()
        assert not w.results.poll(0)
    finally:
        kv.close(linger=0)


class _NoTower:
    """An encoder that must never be asked: the forged request is dropped before the tower."""

    def encode(self, items):
        raise AssertionError("a forged request reached the tower")


def test_an_encode_request_with_an_unregistered_deliver_to_is_dropped_without_connecting():
    worker = EncodeWorker(_NoTower(), "tcp://127.0.0.1:0", "encode-0")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    context = zmq.Context()
    trap = Trap(context)
    requests = connect(configure(context.socket(zmq.PUSH)), worker.input_address)
    try:
        request = EncodeRequest(
            request_id="forged", image=ImageRef(content_hash="h", offset=0, length=2), deliver_to=trap.address
        )
        requests.send_multipart(MessageCodec(EncoderInbound).encode(request, b"image bytes"))
        deadline = time.monotonic() + 10
        while worker.peers.num_refused < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(SETTLE_S)
        assert not trap.was_connected() and worker._outbox._sockets == {} and worker.num_requests_received == 0
    finally:
        worker.stop()
        thread.join(5)
        requests.close(linger=0)
        trap.close()
        context.term()


# ----------------------------------------------------------------------------------------------
# CURVE on a real worker


def test_a_worker_with_keys_serves_the_cluster_and_never_sees_a_plain_sender(make_worker):
    w = make_worker(keys=derive_keys(ClusterSecret(b"the cluster's secret, 32 bytes..")))
    plain = connect(configure(w.context.socket(zmq.PUSH)), w.worker.input_address)
    # a plain sender's request, even one naming the registered results socket, never arrives
    with contextlib.suppress(zmq.Again):  # no handshake, no peer: nowhere to queue it
        plain.send_multipart(MessageCodec(WorkerInbound).encode(_request("forged", w.reply_to)), flags=zmq.NOBLOCK)
    w.send(w.requests, _request("real", w.reply_to))  # the gateway's CURVE client; tokens come back over CURVE
    items = []
    while not any(item.finished for item in items):
        assert w.results.poll(20000), "no output over CURVE"
        items += MessageCodec(OutputBatch).decode(w.results.recv_multipart()).items
    assert not w.results.poll(int(SETTLE_S * 1000))
    assert {item.request_id for item in items} == {"real"} and w.worker.peers.num_refused == 0
    plain.close(linger=0)


# ----------------------------------------------------------------------------------------------
# Size limits that fit the messages


def test_the_kv_socket_takes_the_largest_layer_group_of_a_full_context_and_no_more(llama_dir):
    engine = LLMEngine(model=llama_dir, **ENGINE)
    spec = engine.runner.model.spec
    blocks = -(-engine.max_model_len // ENGINE["block_size"])
    layer_group = min(LAYERS_PER_MESSAGE, spec.num_layers) * 2 * blocks * ENGINE["block_size"]
    layer_group_bytes = layer_group * spec.num_kv_heads * spec.head_dim * engine.runner.dtype.itemsize
    image_bytes = engine.max_model_len * spec.hidden_size * engine.runner.dtype.itemsize
    assert max_kv_frame_bytes(engine) == max(layer_group_bytes, image_bytes, MAX_HEADER_BYTES)
    worker = EngineWorker(engine, "tcp://127.0.0.1:0", "decode-0", role="decode")
    try:
        assert worker.decode_role.socket.getsockopt(zmq.MAXMSGSIZE) == max_kv_frame_bytes(engine) < 4 * 2**30
    finally:
        worker._close()


def test_a_frame_over_the_kv_limit_is_refused(llama_dir):
    """libzmq disconnects a peer whose frame is over the socket's limit: the frame is never delivered."""
    engine = LLMEngine(model=llama_dir, **ENGINE)
    limit = max_kv_frame_bytes(engine)
    context = zmq.Context()
    pull = configure(context.socket(zmq.PULL), limit)
    push = connect(configure(context.socket(zmq.PUSH)), bind(pull, "tcp://127.0.0.1:0"))
    try:
        push.send(bytes(limit + 1))
        assert not pull.poll(1000)
        push.send(bytes(limit))  # a new connection: one at the limit goes through
        assert pull.poll(5000) and len(pull.recv()) == limit
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
