"""The streaming client and run loop against the fake server: timing, errors, payloads, limits."""

import asyncio
import socket

import numpy as np
import pytest

from loadgen import records
from loadgen.client import RequestOptions, StreamingClient, Target
from loadgen.fake_server import FakeServerConfig, serve_in_thread
from loadgen.lengths import FixedLength
from loadgen.metrics import latency_distributions
from loadgen.prompts import PromptSynthesizer, WordTokenizer
from loadgen.runner import run_requests
from loadgen.workloads import MultiTurnWorkload, RandomWorkload

FIRST_TOKEN_S, INTER_TOKEN_S = 0.2, 0.02


def _specs(num_requests, num_output_tokens=10, num_input_tokens=8):
    workload = RandomWorkload(FixedLength(num_input_tokens), FixedLength(num_output_tokens))
    return workload.build(num_requests, PromptSynthesizer(WordTokenizer()), np.random.default_rng(0))


def _run(
    base_url, specs, endpoint="chat", options=None, timeout_s=5.0, time_limit_s=10.0, offsets=None, concurrency=None
):
    target = Target("fake", base_url, "fake", endpoint)
    options = options or RequestOptions()

    async def go():
        async with StreamingClient(target, options, timeout_s) as client:
            return await run_requests(client, specs, offsets or [0.0] * len(specs), concurrency, time_limit_s)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def timed_server():
    with serve_in_thread(FakeServerConfig(FIRST_TOKEN_S, INTER_TOKEN_S)) as fake:
        yield fake


def test_ttft_and_itl_match_the_server_schedule(timed_server):
    outcome = _run(timed_server.base_url, _specs(6, num_output_tokens=10))
    assert [r.error_type for r in outcome.results] == [None] * 6
    stats = latency_distributions(outcome.results)
    assert stats["ttft"]["count"] == 6
    assert stats["ttft"]["min"] >= FIRST_TOKEN_S and stats["ttft"]["max"] < FIRST_TOKEN_S + 0.06
    assert stats["itl"]["count"] == 6 * 9
    assert stats["itl"]["mean"] == pytest.approx(INTER_TOKEN_S, abs=0.003)
    assert stats["itl"]["p50"] == pytest.approx(INTER_TOKEN_S, abs=0.005)
    assert stats["tpot"]["mean"] == pytest.approx(INTER_TOKEN_S, abs=0.003)
    assert stats["e2e"]["mean"] == pytest.approx(FIRST_TOKEN_S + 9 * INTER_TOKEN_S, abs=0.04)
    for result in outcome.results:
        assert (result.num_output_tokens, result.num_content_chunks, result.usage_mismatch) == (10, 10, False)
        assert result.num_input_tokens == 8  # usage.prompt_tokens: the fake counts words


def test_payload_asks_for_a_fixed_length_stream(timed_server):
    timed_server.received.clear()
    _run(timed_server.base_url, _specs(1, num_output_tokens=3))
    body = timed_server.received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (3, 3, True)
    assert body["messages"][-1]["role"] == "user"

    timed_server.received.clear()
    specs = _specs(1, num_output_tokens=3)
    _run(
        timed_server.base_url,
        specs,
        endpoint="completions",
        options=RequestOptions(fixed_output_len=False, prompt_token_ids=True, extra_body={"temperature": 0}),
    )
    body = timed_server.received[0]
    assert body["prompt"] == specs[0].prompt.token_ids
    assert "ignore_eos" not in body and "min_tokens" not in body and body["temperature"] == 0


def test_multi_turn_resends_the_history_with_the_replies(timed_server):
    timed_server.received.clear()
    workload = MultiTurnWorkload(3, FixedLength(4), FixedLength(2))
    specs = workload.build(6, PromptSynthesizer(WordTokenizer()), np.random.default_rng(0))
    assert [(s.conversation, s.turn) for s in specs] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    outcome = _run(timed_server.base_url, specs)
    assert all(r.ok for r in outcome.results)
    last_turn = [b for b in timed_server.received if len(b["messages"]) == 5]
    assert len(last_turn) == 2
    for body in last_turn:
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        assert body["messages"][1]["content"] == " tok tok"


def test_usage_mismatch_when_the_server_packs_tokens():
    with serve_in_thread(FakeServerConfig(0.01, 0.005, tokens_per_chunk=2)) as fake:
        outcome = _run(fake.base_url, _specs(2, num_output_tokens=10))
    for result in outcome.results:
        assert result.ok and result.usage_mismatch
        assert (result.num_output_tokens, result.num_content_chunks, len(result.itl_s)) == (10, 5, 4)
        assert result.tpot_s == pytest.approx((result.e2e_s - result.ttft_s) / 9)


def test_errors_are_counted_by_type():
    pattern = ("", "http-500", "http-429", "stream-error", "drop", "http-503")
    with serve_in_thread(FakeServerConfig(0.01, 0.005, failure_pattern=pattern)) as fake:
        outcome = _run(fake.base_url, _specs(12, num_output_tokens=5), concurrency=1)
    by_type = {}
    for result in outcome.results:
        by_type[result.error_type] = by_type.get(result.error_type, 0) + 1
    assert by_type == {
        None: 2,
        records.HTTP_5XX: 4,
        records.HTTP_4XX: 2,
        records.STREAM_ERROR: 2,
        records.CONNECTION: 2,
    }
    assert sorted(r.http_status for r in outcome.results if r.http_status) == [429, 429, 500, 500, 503, 503]
    stream_errors = [r for r in outcome.results if r.error_type == records.STREAM_ERROR]
    assert all(r.num_content_chunks == 2 and r.e2e_s is None for r in stream_errors)
    assert "mid-stream" in stream_errors[0].error


def test_timeouts_and_refused_connections():
    with serve_in_thread(FakeServerConfig(0.01, 0.005, failure_pattern=("stall",))) as fake:
        outcome = _run(fake.base_url, _specs(2), timeout_s=0.3)
    assert [r.error_type for r in outcome.results] == [records.TIMEOUT] * 2

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = _run(f"http://127.0.0.1:{port}", _specs(2))
    assert [r.error_type for r in outcome.results] == [records.CONNECTION] * 2


def test_time_limit_cancels_in_flight_and_drops_the_rest():
    with serve_in_thread(FakeServerConfig(0.01, 0.005, failure_pattern=("stall",))) as fake:
        outcome = _run(fake.base_url, _specs(4), timeout_s=30, time_limit_s=0.5, offsets=[0.0, 0.0, 5.0, 5.0])
    assert outcome.hit_time_limit and outcome.duration_s == pytest.approx(0.5, abs=0.2)
    assert [r.error_type for r in outcome.results] == [records.CANCELLED] * 2
    assert outcome.num_not_sent == 2


def test_concurrency_caps_requests_in_flight(timed_server):
    specs = _specs(4, num_output_tokens=2)
    outcome = _run(timed_server.base_url, specs, concurrency=2)
    starts = sorted(r.start_s for r in outcome.results)
    assert starts[1] < 0.05 and starts[2] > FIRST_TOKEN_S  # the second pair waits for the first
