"""Restart bookkeeping: the backoff a restarted worker waits, the crash-loop window, the gateway's view."""

from __future__ import annotations

import logging

from services.common.restarts import BACKOFF_MAX_S, RestartWindow, restart_backoff_s
from services.gateway.backend import ClusterStats
from services.gateway.metrics import _WorkerCollector
from services.gateway.worker_restarts import WorkerRestarts


def test_the_first_restart_waits_nothing_then_the_wait_doubles_up_to_the_cap():
    assert [restart_backoff_s(n) for n in range(7)] == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert restart_backoff_s(100) == BACKOFF_MAX_S


def test_the_window_forgets_old_restarts_and_calls_three_recent_ones_a_crash_loop():
    window = RestartWindow(window_s=60.0, crash_loop_restarts=3)
    window.record(0.0)
    window.record(30.0, num_restarts=2)
    assert window.num_recent(30.0) == 3 and window.crash_looping(30.0)
    assert window.num_recent(60.0) == 2 and not window.crash_looping(60.0)  # the restart at 0 s left the window
    assert window.recent_times_s(89.0) == [30.0, 30.0]
    assert window.num_recent(90.0) == 0
    restored = RestartWindow(window_s=60.0, times_s=[50.0, 10.0])  # from a worker's record, any order
    assert restored.recent_times_s(65.0) == [10.0, 50.0]


def test_the_gateway_counts_restarts_from_the_workers_own_count_and_logs_a_crash_loop_once(caplog):
    restarts = WorkerRestarts()
    restarts.add_worker("decode-0", "decode")
    restarts.add_worker("prefill-0", "prefill")
    restarts.on_info("decode-0", 5, now_s=0.0)  # restarts before this gateway came: the baseline, not recent
    restarts.on_info("prefill-0", 0, now_s=0.0)
    assert restarts.snapshot(0.0) == {("decode", "decode-0"): (5, False), ("prefill", "prefill-0"): (0, False)}
    caplog.set_level(logging.INFO, logger="services.gateway.worker_restarts")
    restarts.on_down("decode-0", "RayActorError: killed by signal 9")
    restarts.on_info("decode-0", 6, now_s=10.0)
    restarts.on_info("decode-0", 8, now_s=20.0)  # two restarts between health checks: both count
    assert restarts.snapshot(20.0)[("decode", "decode-0")] == (8, True)
    restarts.on_info("decode-0", 8, now_s=21.0)
    looping = [r.getMessage() for r in caplog.records if "crash-looping" in r.getMessage()]
    assert looping == [
        "worker decode-0 is crash-looping: 3 restarts within 300 s (8 in all); last error: "
        "RayActorError: killed by signal 9"
    ]
    restarts.on_info("decode-0", 8, now_s=310.0)  # the window empties: the loop is over
    assert restarts.snapshot(310.0)[("decode", "decode-0")] == (8, False)
    assert "worker decode-0 is no longer crash-looping (8 restarts in all)" in caplog.text


def test_restarts_and_crash_loops_are_exported_per_worker():
    collector = _WorkerCollector("tiny")
    collector.cluster = ClusterStats(
        worker_restarts={("decode", "decode-0"): (4, True), ("prefill", "prefill-0"): (0, False)}
    )
    samples = {
        (s.name, s.labels["worker"]): s.value
        for family in collector.collect()
        for s in family.samples
        if s.name.startswith("tristage:worker_")
    }
    assert samples == {
        ("tristage:worker_restarts_total", "decode-0"): 4,
        ("tristage:worker_restarts_total", "prefill-0"): 0,
        ("tristage:worker_crash_looping", "decode-0"): 1.0,
        ("tristage:worker_crash_looping", "prefill-0"): 0.0,
    }
