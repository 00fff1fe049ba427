"""Degrade, don't fail: a disaggregated cluster whose prefill worker stops (SIGSTOP) under closed-loop
clients answers every request 200 (the decode worker serves them whole), /ready stays 200, and once
the worker goes on (SIGCONT) placement is disaggregated again."""

import os
import signal
import threading
import time

import httpx
import pytest

from tests.integration.cluster import actor_pid, metric, serving

MODEL = "tristage-tiny"
NUM_CLIENTS = 4
STOPPED_S = 7.0  # longer than the health check's 5 s timeout plus its 1 s interval: the worker is found down
RUN_S = STOPPED_S + 2.0
PROBE_AFTER_S = 3.5  # after the worker goes quiet (3 s), before the health check's timeout (5 to 6 s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with serving(
        "--mode", "disaggregated", "--prefill", "1", "--decode", "1", cache_dir=tmp_path_factory.mktemp("cache")
    ) as proc:
        yield proc


def _complete(client: httpx.Client, i: int) -> int:
    body = {"model": MODEL, "prompt": [10 + i % 50, 11, 12, 13, 14, 15], "max_tokens": 8, "ignore_eos": True}
    return client.post("/v1/completions", json=body).status_code


def _closed_loop(base_url: str, until: float, statuses: list[int]) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        i = 0
        while time.monotonic() < until:
            statuses.append(_complete(client, i))
            i += 1


def _watch_ready(base_url: str, stop: threading.Event, statuses: list[int]) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            statuses.append(client.get("/ready").status_code)
            time.sleep(0.2)


def _decisions(base_url: str, reason: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tristage:router_decisions_total{") and f'reason="{reason}"' in line
    )


def test_a_stopped_prefill_worker_costs_clients_time_not_errors(cluster):
    proc = cluster
    pid = actor_pid(proc, "prefill-0")
    until = time.monotonic() + RUN_S
    statuses: list[list[int]] = [[] for _ in range(NUM_CLIENTS)]
    ready: list[int] = []
    stop_watching = threading.Event()
    clients = [threading.Thread(target=_closed_loop, args=(proc.base_url, until, s)) for s in statuses]
    watcher = threading.Thread(target=_watch_ready, args=(proc.base_url, stop_watching, ready))
    for thread in [*clients, watcher]:
        thread.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGSTOP)
    try:
        # the closed-loop clients all wait on the stopped worker until the health check finds it down;
        # a request arriving once it has gone quiet (STATE_STALE_S, 3 s) but before then avoids it
        time.sleep(PROBE_AFTER_S)
        with httpx.Client(base_url=proc.base_url, timeout=60) as probe:
            started = time.monotonic()
            probe_status, probe_s = _complete(probe, 99), time.monotonic() - started
        time.sleep(STOPPED_S - PROBE_AFTER_S - probe_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    for thread in clients:
        thread.join(90)
    stop_watching.set()
    watcher.join(10)

    answered = [status for client in statuses for status in client]
    events = [line for line in proc.log if any(word in line for word in ("quiet", "is down", "moves from", "again"))]
    assert answered and set(answered) == {200}, (answered, events)
    assert ready and set(ready) == {200}, (ready, events)
    # skipped once quiet (STATE_STALE_S), then found down by the health check (its 5 s timeout)
    assert any("worker prefill-0 has gone quiet" in line for line in proc.log), events
    assert probe_status == 200 and probe_s < 1.5, (probe_s, events)
    assert any("worker prefill-0 is down" in line for line in proc.log), events
    assert _decisions(proc.base_url, "fallback_whole") > 0

    # the worker goes on: the next health check puts it back, and placement is disaggregated again
    deadline = time.monotonic() + 20
    while not any("worker prefill-0 is up again" in line for line in proc.log):
        assert time.monotonic() < deadline, events
        time.sleep(0.2)
    fallbacks = _decisions(proc.base_url, "fallback_whole")
    sent_bytes = metric(httpx.get(proc.base_url + "/metrics").text, "tristage:kv_transfer_bytes_total")
    with httpx.Client(base_url=proc.base_url, timeout=60) as client:
        assert [_complete(client, i) for i in range(3)] == [200] * 3
    assert _decisions(proc.base_url, "fallback_whole") == fallbacks
    assert metric(httpx.get(proc.base_url + "/metrics").text, "tristage:kv_transfer_bytes_total") > sent_bytes
