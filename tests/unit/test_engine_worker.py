"""The worker loop over real ZeroMQ sockets on loopback (no Ray): tokens, errors, aborts."""

import threading

import pytest
import zmq

from services.common.channels import bind, configure
from services.common.codec import MessageCodec
from services.common.messages import (
    AbortRequest,
    DataPlanePeers,
    GenerateRequest,
    OutputBatch,
    RequestError,
    SamplingSpec,
    WorkerInbound,
)
from services.engine import LLMEngine, SamplingParams
from services.workers.engine_worker import EngineWorker


@pytest.fixture
def worker_link(llama_dir):
    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    worker = EngineWorker(engine, "tcp://127.0.0.1:0", "w0")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    ctx = zmq.Context()
    results = configure(ctx.socket(zmq.PULL))
    reply_to = bind(results, "tcp://127.0.0.1:0")
    worker.peers.register(DataPlanePeers(reply_address=reply_to))  # as the gateway does over Ray
    requests = configure(ctx.socket(zmq.PUSH))
    requests.connect(worker.input_address)
    yield engine, requests, results, reply_to
    worker.stop()
    thread.join(5)
    results.close()
    requests.close()
    ctx.term()


def send(sock, message):
    sock.send_multipart(MessageCodec(WorkerInbound).encode(message))


def collect(results, request_ids, timeout_ms=20000):
    codec = MessageCodec(OutputBatch)
    items = {rid: [] for rid in request_ids}
    done = set()
    while done != set(request_ids):
        assert results.poll(timeout_ms), "no output from the worker"
        for item in codec.decode(results.recv_multipart()).items:
            items[item.request_id].append(item)
            if isinstance(item, RequestError) or item.finished:
                done.add(item.request_id)
    return items


def test_tokens_stream_back_equal_to_the_offline_engine(worker_link, llama_dir):
    engine, requests, results, reply_to = worker_link
    spec = SamplingSpec(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2)
    send(
        requests,
        GenerateRequest(request_id="a", prompt_token_ids=list(range(20, 45)), sampling=spec, reply_to=reply_to),
    )
    send(
        requests,
        GenerateRequest(request_id="b", prompt_token_ids=list(range(50, 55)), sampling=spec, reply_to=reply_to),
    )
    items = collect(results, ["a", "b"])
    offline = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    for rid, prompt in (("a", list(range(20, 45))), ("b", list(range(50, 55)))):
        deltas = items[rid]
        tokens = [t for d in deltas for c in d.completions for t in c.token_ids]
        offline.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
        expected = None
        while offline.has_unfinished_requests():
            for out in offline.step():
                expected = out.outputs[0].token_ids
        assert tokens == expected
        assert deltas[-1].finished and deltas[-1].completions[-1].finish_reason == "length"
        positions = [p for d in deltas for c in d.completions for p in (c.logprobs or [])]
        assert [p.sampled.token_id for p in positions] == tokens and all(len(p.top) == 2 for p in positions)
    assert engine.num_free_blocks() == engine.num_usable_blocks()


def test_bad_request_gets_an_error_naming_the_parameter(worker_link):
    _engine, requests, results, reply_to = worker_link
    requests.send_multipart([b"\x93not a message"])  # dropped, the worker goes on
    send(
        requests,
        GenerateRequest(request_id="bad", prompt_token_ids=[1, 2], sampling=SamplingSpec(top_p=5.0), reply_to=reply_to),
    )
    (error,) = collect(results, ["bad"])["bad"]
    assert isinstance(error, RequestError) and (error.status, error.param) == (400, "top_p")


def test_abort_frees_the_request_and_ends_its_stream(worker_link):
    engine, requests, results, reply_to = worker_link
    spec = SamplingSpec(temperature=0, max_tokens=400, ignore_eos=True)
    send(
        requests,
        GenerateRequest(request_id="long", prompt_token_ids=list(range(10, 30)), sampling=spec, reply_to=reply_to),
    )
    assert results.poll(20000)
    results.recv_multipart()
    send(requests, AbortRequest(request_id="long"))
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        threading.Event().wait(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_usable_blocks()
