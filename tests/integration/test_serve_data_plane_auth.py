"""A real disaggregated `tristage serve` with `--data-plane-auth on` over loopback: every ZeroMQ socket pair
(requests, tokens, worker state, KV, acks) is CURVE-authenticated with keys from TRISTAGE_CLUSTER_SECRET,
requests are served as usual, a raw ZeroMQ sender without the keys never gets a message in, and one with
the keys but an address no gateway registered gets its message dropped."""

from __future__ import annotations

import contextlib
import re
import time

import httpx
import openai
import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from services.common.channels import bind, configure, connect
from services.common.codec import MessageCodec
from services.common.messages import GenerateRequest, SamplingSpec, WorkerInbound
from services.common.security import ClusterSecret, derive_keys
from services.engine import LLM, SamplingParams
from services.engine.default_model import default_model_path
from tests.integration.cluster import ServeProcess, metric, serving, wait_until_idle

MODEL = "tristage-tiny"
SECRET = "integration-test cluster secret, 0123456789abcdef"
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with serving(
        "--mode",
        "disaggregated",
        "--prefill",
        "1",
        "--decode",
        "1",
        "--data-plane-auth",
        "on",
        cache_dir=cache,
        env={"TRISTAGE_CLUSTER_SECRET": SECRET},
    ) as proc:
        yield proc, cache
    assert not [line for line in proc.log if SECRET in line], "the cluster secret reached the log"


def _input_address(proc: ServeProcess, worker: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in proc.log:
            m = re.search(rf"{worker} serving on (tcp://\S+)", line)
            if m:
                return m.group(1)
        time.sleep(0.2)
    raise AssertionError(f"no input address for {worker} in the log")


def _send_raw(address: str, keys, reply_to: str) -> int:
    """A GenerateRequest from a raw PUSH socket (a CURVE client when given keys); its first handshake event."""
    context = zmq.Context()
    push = configure(context.socket(zmq.PUSH))
    monitor = push.get_monitor_socket(HANDSHAKE_EVENTS)
    try:
        connect(push, address, keys)
        assert monitor.poll(5000), "no handshake event"
        event = parse_monitor_message(monitor.recv_multipart())["event"]
        request = GenerateRequest(
            request_id="forged",
            prompt_token_ids=list(range(10, 40)),
            sampling=SamplingSpec(max_tokens=4),
            reply_to=reply_to,
        )
        with contextlib.suppress(zmq.Again):  # refused: no peer to queue it for
            push.send_multipart(MessageCodec(WorkerInbound).encode(request), flags=zmq.NOBLOCK)
        time.sleep(0.5)  # for an admitted message to be processed
        return event
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        context.term()


def test_served_over_curve_equal_to_the_offline_engine(cluster):
    proc, cache = cluster
    assert any("data-plane authentication: CURVE, cluster secret given" in line for line in proc.log)
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompts = [list(range(10, 15)), list(range(40, 90))]
    served = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
        for p in prompts
    ]
    llm = LLM(str(default_model_path(cache)))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert served == [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    text = httpx.get(proc.base_url + "/metrics").text
    assert metric(text, "tristage:kv_transfer_bytes_total") > 0  # the KV went over the CURVE socket
    wait_until_idle(proc.base_url)


def test_a_raw_sender_without_the_keys_is_never_processed(cluster):
    proc, _ = cluster
    before = metric(httpx.get(proc.base_url + "/metrics").text, "vllm:prompt_tokens_total")
    context = zmq.Context()
    catcher = configure(context.socket(zmq.PULL))
    catch_address = bind(catcher, "tcp://127.0.0.1:0")
    try:
        for worker in ("prefill-0", "decode-0"):
            # a plain peer: the CURVE server refuses its handshake (the mechanism does not match)
            assert _send_raw(_input_address(proc, worker), None, catch_address) != zmq.EVENT_HANDSHAKE_SUCCEEDED
            wrong = derive_keys(ClusterSecret(b"not this cluster's secret at all"))
            assert _send_raw(_input_address(proc, worker), wrong, catch_address) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert not catcher.poll(500)
        assert metric(httpx.get(proc.base_url + "/metrics").text, "vllm:prompt_tokens_total") == before
    finally:
        catcher.close(linger=0)
        context.term()


def test_a_member_naming_an_unregistered_reply_address_is_dropped_without_a_connection(cluster):
    proc, _ = cluster
    context = zmq.Context()
    catcher = configure(context.socket(zmq.PULL))
    accepted = catcher.get_monitor_socket(zmq.EVENT_ACCEPTED)
    catch_address = bind(catcher, "tcp://127.0.0.1:0")  # plain: a worker that connected would be seen here
    try:
        keys = derive_keys(ClusterSecret(SECRET.encode()))
        assert _send_raw(_input_address(proc, "prefill-0"), keys, catch_address) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        deadline = time.monotonic() + 20  # actors' log lines reach the driver with a delay
        while not any("dropped forged" in line and "was not registered" in line for line in proc.log):
            assert time.monotonic() < deadline, "the worker did not report the dropped request"
            time.sleep(0.2)
        assert not accepted.poll(0) and not catcher.poll(0)
    finally:
        catcher.disable_monitor()
        accepted.close(linger=0)
        catcher.close(linger=0)
        context.term()
