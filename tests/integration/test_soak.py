"""Soak: a disaggregated cluster under closed-loop load for TRISTAGE_SOAK_S seconds (30 minutes by
default), every request 200, and the resident memory of the gateway and each engine worker flat once
warmed up. Deselected by default (`-m soak` runs it; on the GPU machine, add the serve flags for a real
model through TRISTAGE_SOAK_SERVE_ARGS).

Flat means: from the end of the warm-up (the first WARMUP_FRACTION of the run) to the end, RSS grows
by at most MAX_GROWTH_BYTES + MAX_GROWTH_FRACTION of its warmed-up size. A leak of a few hundred bytes
a request is tens of MiB over a soak's ~100k requests, well above that bound; allocator noise and
caches that fill once are not."""

from __future__ import annotations

import os
import shlex
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.cluster import ServeProcess, actor_pid, wait_until_idle

pytestmark = pytest.mark.soak

SOAK_S = float(os.environ.get("TRISTAGE_SOAK_S", "1800"))
SERVE_ARGS = shlex.split(os.environ.get("TRISTAGE_SOAK_SERVE_ARGS", "--mode disaggregated --prefill 1 --decode 1"))
NUM_CLIENTS = 8
SAMPLE_EVERY_S = 10.0
WARMUP_FRACTION = 1 / 3
MAX_GROWTH_BYTES = 16 * 2**20
MAX_GROWTH_FRACTION = 0.02
MODEL = os.environ.get("TRISTAGE_SOAK_MODEL", "tristage-tiny")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _gateway_pid(proc: ServeProcess) -> int:
    """The process that serves HTTP: the one listening on the gateway's port."""
    inode = None
    port_hex = f"{proc.port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port_hex}") and fields[3] == "0A":  # LISTEN
                inode = fields[9]
    assert inode is not None, "nothing listens on the gateway's port"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError("no process holds the gateway's socket")


def _closed_loop(base_url: str, until: float, client_id: int, failures: list[str], count: list[int]) -> None:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        i = 0
        while time.monotonic() < until:
            body = {
                "model": MODEL,
                "prompt": [10 + (client_id * 131 + i) % 500, *range(20, 20 + i % 64)],
                "max_tokens": 8 + i % 24,
                "ignore_eos": True,
                "stream": i % 2 == 0,
            }
            response = client.post("/v1/completions", json=body)
            if response.status_code != 200 or '"error"' in response.text:
                failures.append(f"{response.status_code} {response.text[:200]}")
            count[0] += 1
            i += 1


@pytest.mark.timeout(SOAK_S + 600)
def test_memory_is_flat_under_a_long_closed_loop(tmp_path_factory):
    proc = ServeProcess(*SERVE_ARGS, cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        pids = {"gateway": _gateway_pid(proc)}
        for worker in ("prefill-0", "decode-0"):
            pids[worker] = actor_pid(proc, worker)
        until = time.monotonic() + SOAK_S
        failures: list[str] = []
        count = [0]
        clients = [
            threading.Thread(target=_closed_loop, args=(proc.base_url, until, i, failures, count), daemon=True)
            for i in range(NUM_CLIENTS)
        ]
        for thread in clients:
            thread.start()
        samples: dict[str, list[int]] = {name: [] for name in pids}
        while time.monotonic() < until:
            for name, pid in pids.items():
                samples[name].append(_rss_bytes(pid))
            time.sleep(SAMPLE_EVERY_S)
        for thread in clients:
            thread.join(180)
        wait_until_idle(proc.base_url, timeout_s=60)
        assert not failures, (len(failures), failures[:5])
        report = []
        for name, rss in samples.items():
            warmed = rss[int(len(rss) * WARMUP_FRACTION)]
            growth = rss[-1] - warmed
            report.append(f"{name}: {warmed / 2**20:.0f} MiB -> {rss[-1] / 2**20:.0f} MiB over {count[0]} requests")
            assert growth <= MAX_GROWTH_BYTES + MAX_GROWTH_FRACTION * warmed, report
        print("\n".join(report))
    finally:
        assert proc.stop() == 0
