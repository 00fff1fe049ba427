"""`tristage serve` leaves nothing behind and listens on loopback only (services.supervisor), and a
worker killed again and again is restarted every time, reported crash-looping, while the cluster serves."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.cluster import ServeProcess, serving

MODEL = "tristage-tiny"
RUN_MARK_ENV = "TRISTAGE_TEST_RUN"  # every process of the cluster inherits it: found however it was re-parented


def _cluster_pids(run_mark: str, session: int) -> set[int]:
    """Processes (not zombies) whose environment carries this run's mark, or that are in the serve
    command's session. Both: a process that renames itself (Ray's agents, setproctitle) may overwrite
    its environment block, and a process that starts a session of its own leaves the serve command's."""
    needle = f"{RUN_MARK_ENV}={run_mark}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == session or needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()[0].decode()
    except (OSError, IndexError):  # gone, or a zombie's empty cmdline
        return ""


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(local address, port, pid) of every listening TCP socket the processes hold, from /proc."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                address, port = fields[1].split(":")
                found.append((_address(address), int(port, 16), inodes[fields[9]]))
    return found


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6}'s address (32-bit words in host byte order) as text."""
    import ipaddress

    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def _staging_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("tristage-kv-")}


def _complete(base_url: str, i: int = 0) -> int:
    body = {"model": MODEL, "prompt": [10 + i % 50, 11, 12, 13], "max_tokens": 6, "ignore_eos": True}
    return httpx.post(base_url + "/v1/completions", json=body, timeout=60).status_code


def _worker_series(text: str, name: str, worker: str) -> float | None:
    match = re.search(rf'^{re.escape(name)}{{[^}}]*worker="{worker}"[^}}]*}} (\S+)$', text, re.M)
    return None if match is None else float(match.group(1))


def test_sigkill_of_serve_leaves_no_process_and_no_file_and_it_listened_on_loopback_only(tmp_path):
    run_mark = uuid.uuid4().hex
    files_before = _staging_files()
    proc = ServeProcess(cache_dir=tmp_path, env={RUN_MARK_ENV: run_mark})  # disaggregated: KV through memfds
    try:
        assert _complete(proc.base_url) == 200
        # Ray's agents start beside the raylet and rename themselves (their cmdline) once up: wait for them
        expected, deadline = {"ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::EngineActor"}, time.monotonic() + 30
        while True:
            pids = _cluster_pids(run_mark, proc.sid)
            names = {_process_name(pid) for pid in pids}
            if expected <= names or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert expected <= names, sorted(names)
        listening = _listening(pids)
        assert len({pid for _, _, pid in listening}) >= 4  # gateway, GCS, raylet, workers at least
        assert [sock for sock in listening if sock[0] != "127.0.0.1"] == []
        assert (proc.port in {port for _, port, _ in listening}) and _staging_files() == files_before
        proc.stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _cluster_pids(run_mark, proc.sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in _cluster_pids(run_mark, proc.sid)}
        assert left == {} and _staging_files() == files_before
        assert proc.leftover_processes() == []
    finally:
        proc.kill_all()
        for pid in _cluster_pids(run_mark, proc.sid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def colocated(tmp_path):
    with serving("--mode", "colocated", "--replicas", "2", cache_dir=tmp_path) as proc:
        yield proc


def test_a_worker_killed_four_times_is_restarted_each_time_and_reported_crash_looping(colocated):
    base_url, killed = colocated.base_url, set()
    for restart in range(1, 5):  # one more than the old lifetime cap of 3
        pid = _worker_pid(colocated, "colocated-0", not_in=killed)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        assert _complete(base_url, restart) == 200  # the other replica serves meanwhile
        deadline = time.monotonic() + 90  # model load plus the backoff: 0, 1, 2, 4 s
        while (
            _worker_series(httpx.get(base_url + "/metrics").text, "tristage:worker_restarts_total", "colocated-0")
            != restart
        ):
            assert time.monotonic() < deadline, f"colocated-0 did not come back from restart {restart}"
            time.sleep(0.5)
    text = httpx.get(base_url + "/metrics").text
    assert _worker_series(text, "tristage:worker_crash_looping", "colocated-0") == 1.0
    assert _worker_series(text, "tristage:worker_crash_looping", "colocated-1") == 0.0
    assert _worker_series(text, "tristage:worker_restarts_total", "colocated-1") == 0.0
    assert any("worker colocated-0 is crash-looping: " in line and "last error: " in line for line in colocated.log)
    assert httpx.get(base_url + "/health").status_code == 200 and httpx.get(base_url + "/ready").status_code == 200
    assert [_complete(base_url, i) for i in range(4)] == [200] * 4


def _worker_pid(proc: ServeProcess, worker: str, not_in: set[int], timeout_s: float = 60.0) -> int:
    """The worker's latest process id from its start-up line (forwarded by Ray with a delay), not a killed one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in reversed(proc.log):
            match = re.search(rf"\(EngineActor pid=(\d+)\).*{worker} serving on", line)
            if match and int(match.group(1)) not in not_in:
                return int(match.group(1))
        time.sleep(0.2)
    raise AssertionError(f"no new pid for {worker} in the log")
