"""The supervisor's process tree, without Ray: a server whose descendants hide from signals and from
their session still leaves nothing behind, whichever of the three processes is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.supervisor import descendants, local_ray_environ

# A server like Ray's: it starts an "agent" that ignores SIGTERM, in a session of its own, through a
# parent that exits at once (so the agent is orphaned right away), then prints a line and serves.
SCRIPT = """
import os, signal, subprocess, sys, time
from services.supervisor import supervise

def server():
    agent = "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    spawner = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {agent!r}])"
    subprocess.Popen([sys.executable, "-c", spawner]).wait()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean stop, as serve's drain ends
    print("serving", os.getpid(), os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), flush=True)
    time.sleep(600)
    return 0

sys.exit(supervise(server, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}))
"""


@pytest.fixture
def tree():
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=Path.cwd()
    )
    line = proc.stdout.readline().split()
    assert line[0] == "serving" and line[2] == "0"  # the environment reached the server
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 3:  # watchdog, server, agent
        assert time.monotonic() < deadline, descendants(proc.pid)
        time.sleep(0.05)
    pids = set(descendants(proc.pid))
    yield proc, int(line[1]), pids
    for pid in pids | {proc.pid}:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def _gone(pids: set[int], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2]


def test_sigkill_of_the_supervisor_leaves_no_process(tree):
    proc, _, pids = tree
    proc.kill()
    proc.wait(5)
    assert _gone(pids)


def test_sigterm_stops_the_server_cleanly_and_the_watchdog_sweeps_the_rest(tree):
    proc, _, pids = tree
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0  # the server's own exit status
    assert _gone(pids)


def test_a_killed_watchdog_leaves_the_sweep_to_the_supervisor(tree):
    proc, server_pid, pids = tree
    watchdog_pid = next(pid for pid in pids if int(Path(f"/proc/{pid}/stat").read_text().split()[3]) == proc.pid)
    os.kill(watchdog_pid, signal.SIGKILL)
    assert proc.wait(10) == 128 + signal.SIGKILL
    assert _gone(pids) and server_pid in pids


def test_ray_binds_loopback_only_with_a_loopback_data_plane():
    for host in ("127.0.0.1", "::1", "localhost"):
        assert local_ray_environ(host) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert local_ray_environ("auto") == {} and local_ray_environ("10.0.0.5") == {}
