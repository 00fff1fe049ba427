"""Chaos: each role of a disaggregated cluster killed (SIGKILL) or stopped (SIGSTOP) under closed-loop
clients. Every request ends 200 (or 429: admission may refuse while a stage is down); once the worker is
back, every gauge and every KV block returns to zero. (A stopped prefill worker: test_serve_degraded;
a transfer cut mid-way and a decode worker that never acks: tests/unit/test_transfer_faults.py.)

Each fault runs on the same cluster, one after another; each test waits for the cluster to be whole
again before it ends, so the next one starts from a healthy cluster."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.integration.cluster import ServeProcess, actor_pid, metric, serving, wait_until_idle, wait_until_ready

MODEL = "tristage-tiny"
NUM_CLIENTS = 4
FAULT_AFTER_S = 1.0  # load runs this long before the fault
STOPPED_S = 7.0  # longer than the health check's timeout (5 s) plus its interval (1 s): found down
RUN_S = FAULT_AFTER_S + STOPPED_S + 2.0
BACK_TIMEOUT_S = 90.0  # a killed actor restarts and reloads the tiny model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with serving(
        "--mode", "disaggregated", "--prefill", "1", "--decode", "1", cache_dir=tmp_path_factory.mktemp("cache")
    ) as proc:
        yield proc


def _closed_loop(base_url: str, until: float, client_id: int, statuses: list[int]) -> None:
    """One client: a request, its answer, the next, until `until`. Streams half the time, so a fault
    also lands mid-stream."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        i = 0
        while time.monotonic() < until:
            body = {
                "model": MODEL,
                "prompt": [10 + (client_id * 97 + i) % 200, 11, 12, 13, 14, 15, 16, 17],
                "max_tokens": 16,
                "ignore_eos": True,
                "stream": i % 2 == 1,
            }
            if body["stream"]:
                with client.stream("POST", "/v1/completions", json=body) as response:
                    text = "".join(response.iter_text())
                    # a stream that started 200 and then carried an error event is a client error too
                    statuses.append(response.status_code if '"error"' not in text else 599)
            else:
                statuses.append(client.post("/v1/completions", json=body).status_code)
            i += 1


def _under_load(base_url: str, fault, recover=None) -> list[int]:
    """Run the clients for RUN_S; `fault()` after FAULT_AFTER_S, `recover()` STOPPED_S later."""
    until = time.monotonic() + RUN_S
    statuses: list[list[int]] = [[] for _ in range(NUM_CLIENTS)]
    clients = [
        threading.Thread(target=_closed_loop, args=(base_url, until, i, s), daemon=True) for i, s in enumerate(statuses)
    ]
    for thread in clients:
        thread.start()
    time.sleep(FAULT_AFTER_S)
    fault()
    try:
        if recover is not None:
            time.sleep(STOPPED_S)
    finally:
        if recover is not None:
            recover()
    for thread in clients:
        thread.join(180)
        assert not thread.is_alive(), "a client request hung"
    return [status for client in statuses for status in client]


def _wait_for_log(proc: ServeProcess, pattern: str, after: int, timeout_s: float = BACK_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(re.search(pattern, line) for line in proc.log[after:]):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n" + "".join(proc.log[after:][-40:])
        time.sleep(0.2)


def _assert_whole_and_idle(proc: ServeProcess) -> None:
    """The cluster serves again, and every gauge and KV block is back at zero."""
    wait_until_ready(proc.base_url)
    with httpx.Client(base_url=proc.base_url, timeout=60) as client:
        body = {"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 4, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).status_code == 200
    wait_until_idle(proc.base_url, timeout_s=30)
    text = httpx.get(proc.base_url + "/metrics").text
    for gauge in (
        "tristage:gateway_requests_in_flight",
        "tristage:gateway_queued_requests",
        "tristage:gateway_queued_prompt_tokens",
    ):
        assert metric(text, gauge) == 0, gauge


def _events(proc: ServeProcess, after: int) -> list[str]:
    words = ("quiet", "is down", "is back", "again", "moves from", "migrat")
    return [line for line in proc.log[after:] if any(word in line for word in words)]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_killed_worker_costs_clients_time_not_errors(cluster, role):
    proc = cluster
    pid, mark = actor_pid(proc, f"{role}-0"), len(proc.log)
    answered = _under_load(proc.base_url, lambda: os.kill(pid, signal.SIGKILL))
    assert answered and set(answered) <= {200, 429} and 200 in answered, (answered, _events(proc, mark))
    # Ray restarts the actor; the gateway finds it at its new addresses and places on it again
    _wait_for_log(proc, rf"worker {role}-0 is back at", mark)
    _assert_whole_and_idle(proc)


def test_a_stopped_decode_worker_costs_clients_time_not_errors(cluster):
    proc = cluster
    pid, mark = actor_pid(proc, "decode-0"), len(proc.log)
    answered = _under_load(
        proc.base_url, lambda: os.kill(pid, signal.SIGSTOP), recover=lambda: os.kill(pid, signal.SIGCONT)
    )
    assert answered and set(answered) <= {200, 429} and 200 in answered, (answered, _events(proc, mark))
    _wait_for_log(proc, r"worker decode-0 is (up again|heard from again)", mark)
    _assert_whole_and_idle(proc)
