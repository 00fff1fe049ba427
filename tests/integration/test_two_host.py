"""Two hosts, simulated on this machine: the documented multi-host cluster starts, serves what a colocated
engine would, and survives the remote host's faults with no client error.

    host A (this network namespace)               host B (its own net, UTS, mount and PID namespaces)
    Ray head  {"prefill": 1}  10.213.x.1  ──veth──  10.213.x.2  Ray node {"decode": 1}
    tristage serve --ray-address HEAD --data-plane-host auto      the decode pool, pinned by its role resource
    gateway on 127.0.0.1, prefill-0

Host B has its own hostname and /dev/shm, so KV goes from prefill-0 to decode-0 as ZeroMQ frames over TCP,
never through shared memory. Then, each under a few closed-loop clients: (a) SIGKILL of the decode actor's
process (Ray restarts it on host B), (b) the link cut for 10 s and put back, (c) host B crashing (every
process of it killed). Every request must end 200 with the colocated engine's text (prefill-0 serves
requests whole while the decode stage is down: "fallback_whole"; requests caught midway move there), the
cluster must be whole again after (a) and (b), and no request or KV block may be left behind. Last, host B
comes back (a new Ray node) and gets the decode pool back.

Every process of the cluster gets the same Ray token (RAY_AUTH_TOKEN) and tristage cluster secret
(TRISTAGE_CLUSTER_SECRET, which keys the data plane's CURVE authentication off loopback), made up here.

Skipped where namespaces or a veth pair cannot be made (not root, no CAP_NET_ADMIN, a locked-down container).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.cluster import ServeProcess, free_port, metric, wait_until_idle
from tests.integration.netns import SimulatedHost, unavailable_reason

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(420)]

MODEL = "tristage-tiny"
RAY = str(Path(sys.executable).with_name("ray"))
NUM_CLIENTS = 3
CUT_S = 10.0
OBJECT_STORE_BYTES = 80 * 2**20  # the data plane is ZeroMQ: Ray's object store carries control calls only
# every port a Ray head opens that we can name: other Ray clusters on this machine (other tests) keep theirs
HEAD_PORT_OPTIONS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


# ---------------------------------------------------------------------------------------------- the cluster


@dataclass
class TwoHosts:
    host: SimulatedHost
    serve: ServeProcess
    cache_dir: Path
    env: dict[str, str]
    ray_address: str
    node_log: Path
    node: subprocess.Popen | None = None

    def log_since(self, start: int) -> str:
        return "".join(self.serve.log[start:])


def _cluster_env() -> dict[str, str]:
    """Every process of the cluster (head, node, serve) shares Ray's token and tristage's cluster secret
    (CURVE on the data plane once it is not loopback), both made up for this test alone."""
    return {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "TRISTAGE_CLUSTER_SECRET": secrets.token_hex(32),
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    }


# runs a command in the session it leads; once the command exits or our stdin closes (at the end of the
# test, or when the test process dies without cleaning up), kills that session: the command and all it started
_SESSION_GUARD = r"""
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
closed = threading.Event()
threading.Thread(target=lambda: (sys.stdin.buffer.read(), closed.set()), daemon=True).start()
while child.poll() is None and not closed.wait(0.5):
    pass
for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    try:
        if os.getsid(pid) == os.getsid(0):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


@contextlib.contextmanager
def _ray_head(ip: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """`ray start --head --block` on host A's end of the link, in its own session and temp dir; at the end
    (or when this process dies) every process of that session dies (Ray's daemons and workers; no other
    cluster's)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray2h", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SESSION_GUARD,
            RAY,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={ip}",
            f"--port={port}",
            "--num-cpus=1",
            '--resources={"prefill": 1}',
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            *(f"--{option}={free_port()}" for option in HEAD_PORT_OPTIONS),
        ],
        stdin=subprocess.PIPE,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # until the GCS answers on its port
            try:
                socket.create_connection((ip, port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, "the Ray head exited:\n" + log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the Ray head did not start:\n" + log.read_text()[-3000:]
                time.sleep(0.3)
        yield f"{ip}:{port}"
    finally:
        head.stdin.close()  # the guard kills the head's session and exits
        try:
            head.wait(30)
        finally:
            _kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_session(sid: int) -> None:
    """SIGKILL to every process of the session `sid` (a process started with start_new_session)."""
    for _ in range(3):
        found = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)
                    found = True
        if not found:
            return
        time.sleep(0.2)


def _start_node(cluster_host: SimulatedHost, ray_address: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A Ray node on host B offering the decode role (and one CPU for its actor)."""
    return cluster_host.popen(
        [
            RAY,
            "start",
            "--block",
            f"--address={ray_address}",
            f"--node-ip-address={cluster_host.ip}",
            "--num-cpus=1",
            '--resources={"decode": 1}',
            "--temp-dir=/tmp/ray",  # host B's own /tmp
            "--disable-usage-stats",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
        ],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=os.getcwd(),
    )


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Iterator[TwoHosts]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot simulate a second host here: {reason}")
    logs = tmp_path_factory.mktemp("two-host-logs")
    # the model directory must be at the same path on both hosts, and host B's /tmp is its own: outside /tmp
    outside_tmp = next(d for d in ("/var/tmp", str(Path.home())) if Path(d).is_dir())
    cache_dir = Path(tempfile.mkdtemp(prefix="tristage-two-host-", dir=outside_tmp))
    env = _cluster_env()
    serve = None
    try:
        with SimulatedHost(f"host-b-{os.getpid()}") as host, _ray_head(host.host_ip, env, logs / "head.log") as address:
            node = _start_node(host, address, env, logs / "node.log")
            serve = ServeProcess(
                "--ray-address",
                address,
                "--data-plane-host",
                "auto",
                "--mode",
                "disaggregated",
                "--prefill",
                "1",
                "--decode",
                "1",
                "--drain-timeout",
                "5",
                cache_dir=cache_dir,
                env=env,
                startup_timeout_s=240,
            )
            cluster = TwoHosts(host, serve, cache_dir, env, address, logs / "node.log", node)
            yield cluster
            assert serve.stop(timeout_s=60) == 0, "".join(serve.log[-40:])
            # joined to a Ray cluster, serve leaves the pools to it and starts nothing else of its own
            assert serve.leftover_processes() == []
    finally:
        if serve is not None:
            serve.kill_all()
        shutil.rmtree(cache_dir, ignore_errors=True)


@dataclass
class Reference:
    """What the colocated engine (the offline LLM on the same model directory) answers, greedy."""

    llm: object
    load_texts: list[str]  # for each load prompt

    def texts(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        from services.engine import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [o.outputs[0].text for o in self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def reference(two_hosts) -> Reference:
    from services.engine import LLM
    from services.engine.default_model import default_model_path

    ref = Reference(LLM(str(default_model_path(two_hosts.cache_dir))), [])
    ref.load_texts = ref.texts([_load_prompt(i) for i in range(NUM_LOAD_PROMPTS)], LOAD_MAX_TOKENS)
    return ref


# ---------------------------------------------------------------------------------------------- load


NUM_LOAD_PROMPTS = 40
LOAD_MAX_TOKENS = 8


def _load_prompt(i: int) -> list[int]:
    return [10 + i % NUM_LOAD_PROMPTS, 11, 12, 13, 14, 15, 16, 17]


def _body(i: int) -> dict:
    prompt = _load_prompt(i)
    return {"model": MODEL, "prompt": prompt, "max_tokens": LOAD_MAX_TOKENS, "temperature": 0, "ignore_eos": True}


class ClosedLoad:
    """NUM_CLIENTS clients, each sending its next greedy completion as soon as the last one answers, until
    stopped; every answer must be 200 with the text a colocated engine gives (`expected[i % 40]`), whether
    the request ran on both hosts, whole on prefill-0, or moved there midway."""

    def __init__(self, base_url: str, expected: list[str], num_clients: int = NUM_CLIENTS) -> None:
        self.base_url = base_url
        self.expected = expected
        self.results: list[tuple[int, float, str]] = []  # (status, seconds, what was wrong) of each request
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(num_clients)]

    def __enter__(self) -> ClosedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in self._threads), "a client is still waiting"

    def _client(self, c: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=90) as client:
            i = c * 1000
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/v1/completions", json=_body(i))
                    status, wrong = response.status_code, response.text[:300]
                    if status == 200:
                        text, want = response.json()["choices"][0]["text"], self.expected[i % NUM_LOAD_PROMPTS]
                        # -1: answered, but not what the colocated engine says
                        status, wrong = (200, "") if text == want else (-1, f"{text!r}, not {want!r}")
                except httpx.HTTPError as exc:
                    status, wrong = 0, repr(exc)
                self.results.append((status, time.monotonic() - started, wrong))
                i += 1

    def assert_all_ok(self, phase: str, events: list[str]) -> None:
        failed = [r for r in self.results if r[0] != 200]
        slowest = max((seconds for _, seconds, _ in self.results), default=0.0)
        # shown with a failure (and with -s): what the clients saw, and what the gateway said meanwhile
        summary = f"{phase}: {len(self.results)} requests, {len(failed)} failed, slowest {slowest:.1f} s"
        print("", summary, *events, sep="\n")
        assert self.results and not failed, (len(self.results), failed[:5], events[-30:])


_EVENT = re.compile(r"is down|is back|up again|gone quiet|heard from again|moves from|recomputes|lost|fail|rror")


def _events(cluster: TwoHosts, start: int = 0) -> list[str]:
    return [line.rstrip()[:300] for line in cluster.serve.log[start:] if _EVENT.search(line)]


def _wait_for_log(cluster: TwoHosts, pattern: str, start: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, cluster.log_since(start)):
        assert time.monotonic() < deadline, (f"no {pattern!r} in the log", _events(cluster, start))
        time.sleep(0.2)


def _path_bytes(text: str) -> dict[tuple[str, str, str], float]:
    """tristage:kv_transfer_path_bytes_total by (stage, end, path)."""
    found: dict[tuple[str, str, str], float] = {}
    for labels, value in re.findall(r"^tristage:kv_transfer_path_bytes_total\{([^}]*)\} (\S+)$", text, re.M):
        key = tuple(re.search(rf'{name}="([^"]*)"', labels).group(1) for name in ("stage", "end", "path"))
        found[key] = found.get(key, 0.0) + float(value)
    return found


def _decisions(base_url: str, reason: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tristage:router_decisions_total{") and f'reason="{reason}"' in line
    )


def _decode_actor_pid(cluster: TwoHosts, timeout_s: float = 30) -> int:
    """The decode actor's process on host B (as this namespace numbers it): Ray titles it ray::EngineActor."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors = [pid for pid, cmd in cluster.host.processes().items() if cmd.startswith("ray::EngineActor")]
        if len(actors) == 1:
            return actors[0]
        assert time.monotonic() < deadline, cluster.host.processes()
        time.sleep(0.2)


def _assert_disaggregated_over_frames(cluster: TwoHosts) -> None:
    """A request placed on both hosts again: its KV crosses the link as frames."""
    base_url = cluster.serve.base_url
    before = _path_bytes(httpx.get(base_url + "/metrics", timeout=30).text)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        body = {"model": MODEL, "prompt": list(range(600, 640)), "max_tokens": 4, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).status_code == 200
    after = _path_bytes(httpx.get(base_url + "/metrics", timeout=30).text)
    key = ("decode", "received", "frames")
    assert after.get(key, 0) > before.get(key, 0), (before, after, _events(cluster))


def _assert_nothing_leaked(cluster: TwoHosts, timeout_s: float = 30.0) -> None:
    """No request left running and no KV block held on any worker, and none left open in the gateway."""
    wait_until_idle(cluster.serve.base_url, timeout_s)
    text = httpx.get(cluster.serve.base_url + "/metrics", timeout=30).text
    assert metric(text, "tristage:gateway_requests_in_flight") == 0, _counters(text)


def _counters(text: str) -> list[str]:
    """The metrics that tell what a fault did (for failure messages)."""
    names = ("kv_transfer_failures", "kv_transfer_fallbacks", "request_migrations", "worker_restarts", "in_flight")
    return [line for line in text.splitlines() if not line.startswith("#") and any(n in line for n in names)]


# ---------------------------------------------------------------------------------------------- the tests


def test_the_cluster_spans_both_hosts_and_equals_colocated(two_hosts, reference):
    cluster = two_hosts
    log = "".join(cluster.serve.log)
    # `auto` became each process's own node address: prefill-0 on host A's end of the link, decode-0 on B's
    assert re.search(rf"prefill-0 serving on tcp://{re.escape(cluster.host.host_ip)}:\d+", log), log[-3000:]
    assert re.search(rf"decode-0 serving on tcp://{re.escape(cluster.host.ip)}:\d+", log), log[-3000:]

    shared = list(range(40, 80))
    prompts = [list(range(10, 15)), shared + [3, 4], shared + list(range(200, 237)), list(range(300, 331))]
    with httpx.Client(base_url=cluster.serve.base_url, timeout=60) as client:
        served = []
        for p in prompts:
            body = {"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            served.append(response.json()["choices"][0]["text"])
    expected = reference.texts(prompts, 12)
    assert served == expected
    assert _decisions(cluster.serve.base_url, "fallback_whole") == 0  # every request went over both hosts

    # the hosts share no /dev/shm: every KV byte crossed the link as frames, counted at both ends
    text = httpx.get(cluster.serve.base_url + "/metrics", timeout=30).text
    paths = _path_bytes(text)
    assert paths.get(("prefill", "sent", "frames"), 0) > 0, paths
    assert paths.get(("decode", "received", "frames"), 0) == paths[("prefill", "sent", "frames")], paths
    assert sum(v for (_, _, path), v in paths.items() if path == "shared_memory") == 0, paths
    _assert_nothing_leaked(cluster)


def test_a_killed_remote_decode_actor_costs_clients_nothing(two_hosts, reference):
    cluster = two_hosts
    start = len(cluster.serve.log)
    victim = _decode_actor_pid(cluster)
    with ClosedLoad(cluster.serve.base_url, reference.load_texts) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        # Ray restarts it on host B (the only node offering "decode"); the gateway finds its new sockets
        _wait_for_log(cluster, r"worker decode-0 is back at tcp://" + re.escape(cluster.host.ip), start, 90)
        time.sleep(1.0)
    load.assert_all_ok("decode actor killed", _events(cluster, start))
    assert _decode_actor_pid(cluster) != victim
    _assert_disaggregated_over_frames(cluster)
    _assert_nothing_leaked(cluster)


def test_a_cut_link_costs_clients_time_not_errors_and_the_cluster_heals(two_hosts, reference):
    cluster = two_hosts
    start = len(cluster.serve.log)
    decode_pid = _decode_actor_pid(cluster)
    fallbacks = _decisions(cluster.serve.base_url, "fallback_whole")
    with ClosedLoad(cluster.serve.base_url, reference.load_texts) as load:
        time.sleep(1.0)
        cluster.host.cut_link()
        try:
            time.sleep(CUT_S)
        finally:
            cluster.host.restore_link()
        time.sleep(2.0)
    events = _events(cluster, start)
    load.assert_all_ok("link cut", events)
    # host B out of reach: decode-0 found down (its requests moved), prefill-0 served requests whole
    assert any("worker decode-0 is down" in line for line in events), events
    assert _decisions(cluster.serve.base_url, "fallback_whole") > fallbacks, events
    # the link back: the same decode-0 process (Ray kept host B's node) serves again, KV crosses the link
    _wait_for_log(cluster, r"worker decode-0 is up again", start, 60)
    assert _decode_actor_pid(cluster) == decode_pid
    _assert_disaggregated_over_frames(cluster)
    _assert_nothing_leaked(cluster, timeout_s=60)


def test_a_crashed_remote_host_costs_clients_nothing(two_hosts, reference):
    cluster = two_hosts
    start = len(cluster.serve.log)
    fallbacks = _decisions(cluster.serve.base_url, "fallback_whole")
    with ClosedLoad(cluster.serve.base_url, reference.load_texts) as load:
        time.sleep(1.0)
        cluster.host.kill_all()  # host B's Ray node and the decode actor with it
        _wait_for_log(cluster, r"worker decode-0 is down", start, 30)
        time.sleep(4.0)
    events = _events(cluster, start)
    load.assert_all_ok("host B crashed", events)
    assert _decisions(cluster.serve.base_url, "fallback_whole") > fallbacks, events
    assert httpx.get(cluster.serve.base_url + "/ready", timeout=10).status_code == 200
    _assert_nothing_leaked(cluster)


def test_host_b_back_gets_the_decode_pool_back(two_hosts):
    """Host B reboots (a new Ray node with the decode role): Ray restarts the decode actor there, the gateway
    finds its new sockets, and requests span both hosts again."""
    cluster = two_hosts
    start = len(cluster.serve.log)
    cluster.node = _start_node(cluster.host, cluster.ray_address, cluster.env, cluster.node_log)
    _wait_for_log(cluster, r"worker decode-0 is back at tcp://" + re.escape(cluster.host.ip), start, 120)
    _wait_for_log(cluster, r"worker decode-0 is up again", start, 30)
    _assert_disaggregated_over_frames(cluster)
    _assert_nothing_leaked(cluster)
