"""Start a real `tristage serve` in a subprocess on loopback, and check it leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`tristage serve ...` in its own session (so every process it starts can be found afterwards)."""

    def __init__(self, *args: str, cache_dir: Path, env: dict | None = None, startup_timeout_s: float = 240) -> None:
        # every actor's log line reaches the driver (Ray otherwise folds similar lines from several actors)
        full_env = {
            **os.environ,
            "TRISTAGE_CACHE_DIR": str(cache_dir),
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
            **(env or {}),
        }
        # free_port's port can be taken (by one of Ray's many processes) before serve binds it: then serve
        # exits at once, and a new port is tried
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.base_url = f"http://127.0.0.1:{self.port}"
            cmd = [sys.executable, "-m", "services.cli", "serve", "--port", str(self.port), *args]
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True
            )
            self.sid = self.proc.pid
            self.log: list[str] = []
            self._serving = False
            done = threading.Event()  # serving, or the output ended (serve exited)
            threading.Thread(target=self._read, args=(done,), daemon=True).start()
            done.wait(startup_timeout_s)
            if self._serving:
                return
            self.stop(signal.SIGKILL)
            if not any("address already in use" in line for line in self.log) or attempt == PORT_ATTEMPTS - 1:
                raise RuntimeError("tristage serve did not become ready:\n" + "".join(self.log[-60:]))

    def _read(self, done: threading.Event) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if re.search(r"tristage is serving .* at http", line):
                self._serving = True
                done.set()
        done.set()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.sid, signal.SIGKILL)
            self.proc.wait(10)
            raise

    def leftover_processes(self) -> list[str]:
        """Processes still alive in the server's session (Ray's included), after waiting a little for exits."""
        deadline = time.monotonic() + 20
        while True:
            left = _processes_in_session(self.sid)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.sid, signal.SIGKILL)


@contextlib.contextmanager
def serving(*args: str, cache_dir: Path, env: dict | None = None) -> Iterator[ServeProcess]:
    """`tristage serve ARGS` for the length of a `with` (a fixture's body): on the way out it drains on
    SIGTERM, must exit 0, and must leave no process of its session behind."""
    proc = ServeProcess(*args, cache_dir=cache_dir, env=env)
    yield proc
    assert proc.stop() == 0
    assert proc.leftover_processes() == []


def _processes_in_session(sid: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
                if state != "Z":
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (OSError, ProcessLookupError):
            continue
    return found


def metric(text: str, name: str) -> float:
    """Sum of every sample of a metric in Prometheus' text format, over its label sets."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_until_idle(base_url: str, timeout_s: float = 20.0) -> None:
    """Until /metrics shows no running request and no KV block in use on any worker."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(base_url + "/metrics").text
        if metric(text, "vllm:num_requests_running") == 0 and metric(text, "vllm:kv_cache_usage_perc") == 0:
            return
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.2)


def actor_pid(proc: ServeProcess, worker: str) -> int:
    """The worker's process id, from its start-up line (Ray forwards actor logs to the driver, with a delay)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in reversed(proc.log):
            m = re.search(rf"\(EngineActor pid=(\d+)\).*{worker} serving on", line)
            if m:
                return int(m.group(1))
        time.sleep(0.2)
    raise AssertionError(f"no pid for {worker} in the log: {[line for line in proc.log if 'serving' in line]}")


def wait_until_ready(base_url: str, timeout_s: float = 90.0) -> None:
    """Until /ready answers 200 (the cluster can serve: some engine worker is up)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(base_url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the cluster did not become ready again"
        time.sleep(0.5)


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """A Ray head in its own session (`ray start --block`) on a free port, killed with its session at the end;
    yields its address."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            '--resources={"colocated": 2}',
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # until the GCS answers on its port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)
