"""A real disaggregated cluster (a prefill and a decode actor, KV over ZeroMQ, the prefix-aware
router): its greedy output equals the colocated engine's, a decode worker short of KV room makes
requests wait rather than fail, and every block is free afterwards."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from services.engine import LLM, SamplingParams
from services.engine.default_model import default_model_path
from tests.integration.cluster import actor_pid, metric, serving, wait_until_idle, wait_until_ready

MODEL = "tristage-tiny"
KV_BLOCKS = 40  # per worker, of 16 tokens: room for 4 requests of 40 prompt + 100 output tokens at once


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with serving(
        "--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--router-policy", "preble",
        "--num-kv-blocks", str(KV_BLOCKS), cache_dir=cache,
    ) as proc:  # fmt: skip
        yield proc, cache


def test_disaggregated_greedy_output_equals_colocated(cluster):
    proc, cache = cluster
    shared = list(range(40, 80))
    prompts = [list(range(10, 15)), shared + [3, 4], shared + list(range(200, 237)), list(range(300, 331))]
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    served = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
        for p in prompts
    ]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=prompts[2], max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        if c.choices
    )
    llm = LLM(str(default_model_path(cache)))
    expected = [
        o.outputs[0].text
        for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
    ]
    assert served == expected
    assert streamed == expected[2]
    wait_until_idle(proc.base_url)  # prefill frees its blocks on the decode worker's ack, decode at the end


def test_n_greater_than_one_is_served_whole_by_a_decode_worker(cluster):
    proc, _ = cluster
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(
        model=MODEL, prompt=[7, 8, 9], max_tokens=5, n=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert len(out.choices) == 3 and len({c.text for c in out.choices}) == 1


def test_a_decode_worker_short_of_kv_room_makes_requests_wait_not_fail(cluster):
    """16 requests needing 9 blocks each at once: the decode worker's 40 hold 4, the router says no room for
    the 5th (its in-flight estimates count the first 4), and the gateway queues the rest until the decode
    worker reports room. All complete; nothing is refused. (16, not 8: on a loaded machine the router's
    view can lag, between a request's admission and the next report of free blocks, by enough to let a
    few more through to wait in the decode worker's own queue instead.)"""
    proc, _ = cluster
    wait_until_ready(proc.base_url)
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def one(i: int):
        return client.completions.create(
            model=MODEL, prompt=list(range(100 + i, 140 + i)), max_tokens=100, extra_body={"ignore_eos": True}
        )

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, range(16)))
    assert [(o.choices[0].finish_reason, o.usage.completion_tokens) for o in outs] == [("length", 100)] * 16
    text = httpx.get(proc.base_url + "/metrics").text
    assert metric(text, "tristage:kv_room_waits_total") > 0
    assert metric(text, "tristage:requests_waiting_for_kv_room") == 0
    wait_until_idle(proc.base_url)


def _wait_until_reconnected(proc, worker, timeout_s: float = 90.0) -> None:
    """Until the gateway has found the worker's restarted process. /ready alone is not enough: Ray may
    restart the actor before a health check sees it down, and the gateway only learns of the new
    process (and stops sending to the dead socket) at its next check."""
    deadline = time.monotonic() + timeout_s
    while not any(f"worker {worker} is back at" in line for line in proc.log):
        assert time.monotonic() < deadline, "the gateway never reconnected to " + worker
        time.sleep(0.2)
    wait_until_ready(proc.base_url)


@pytest.mark.parametrize("victim", ["decode-0", "prefill-0"])
def test_a_worker_killed_mid_stream_costs_the_client_nothing_but_time(cluster, victim):
    import os
    import signal

    proc, cache = cluster
    prompt = list(range(500, 530))
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    parts, finish = [], None
    try:
        for i, chunk in enumerate(stream):
            if i == 5:
                os.kill(actor_pid(proc, victim), signal.SIGKILL)
            if chunk.choices:
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
    finally:
        _wait_until_reconnected(proc, victim)  # the cluster is whole again for what follows
    llm = LLM(str(default_model_path(cache)))
    expected = (
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))[0]
        .outputs[0]
        .text
    )
    events = [line for line in proc.log if re.search(r"moves from|is down|is back|recomputes", line)]
    assert "".join(parts) == expected and finish == "length", events
    if victim == "decode-0":  # the request moved with its tokens; a prefill worker is done after the first token
        assert re.search(rf"request \S+ moves from {victim}", "".join(proc.log))


def test_metrics_show_transfers_and_router_decisions(cluster):
    proc, _ = cluster
    wait_until_ready(proc.base_url)
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    client.completions.create(model=MODEL, prompt=list(range(20, 60)), max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(proc.base_url + "/metrics").text
    assert metric(text, "tristage:kv_transfer_bytes_total") > 0
    assert metric(text, "tristage:kv_transfer_seconds_count") > 0
    # both ends count, by path: prefill and decode share this host, so the bytes went through shared memory
    shared = set()
    for labels, value in re.findall(r"^tristage:kv_transfer_path_bytes_total\{([^}]*)\} (\S+)$", text, re.M):
        if 'path="shared_memory"' in labels and float(value) > 0:
            shared.add(re.search(r'end="(\w+)"', labels).group(1))
    assert shared == {"sent", "received"}, [line for line in text.splitlines() if "path_bytes" in line]
    assert metric(text, "tristage:router_decisions_total") > 0
    assert "tristage:router_predicted_hit_tokens_total" in text and "tristage:request_migrations_total" in text
