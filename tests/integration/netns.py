"""A second host simulated on this machine: a process holding its own network, UTS (hostname), mount
(a private /dev/shm and /tmp) and PID namespaces, joined to the root network namespace by a veth pair.

    with SimulatedHost("node2") as host:        # host.host_ip on our side, host.ip inside
        proc = host.popen(["ray", "start", ...])  # runs in every namespace of the holder (nsenter)
        host.cut_link(); host.restore_link()      # the cable pulled and put back
        host.kill_all()                           # every process of the host but its init dies (a crash)

The holder is the namespace's PID 1: a small reaper that adopts orphans (Ray's daemons outlive `ray
start`) and exits when its stdin closes, so the namespaces (and the veth pair with them) go away even
if the test process is killed: the kernel kills every process of a PID namespace whose init exits.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `unshare`, `nsenter` and `ip`; `unavailable_reason()`
says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# PID 1 of the namespace: set the hostname, private /dev/shm and /tmp, loopback up; then reap orphans
# until the parent closes our stdin (the test ended, or died)
_INIT = r"""
import os, select, signal, socket, subprocess, sys
name, shm_size, stash, keep = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
socket.sethostname(name)
# paths under /tmp this host must still see (the Python environment and the code, as a real host has
# them installed): the old /tmp is bound to `stash` first, each kept path bound back over the new tmpfs
subprocess.run(["mount", "--bind", "/tmp", stash], check=True)
for target in ("/dev/shm", "/tmp"):
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={shm_size},mode=1777", "tmpfs", target], check=True)
for path in keep:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "--bind", stash + path[len("/tmp"):], path], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
print("ready", flush=True)
while True:
    readable, _, _ = select.select([sys.stdin], [], [], 0.5)
    if readable and not os.read(sys.stdin.fileno(), 4096):
        break  # EOF: our parent is gone or done with us
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
os.kill(-1, signal.SIGKILL)  # as init, every other process of the namespace
# and the veth pair now: sockets of the dead processes still sending over a cut link would keep the network
# namespace (and the pair with it) alive for minutes
for line in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines():
    device = line.split(":")[1].strip().split("@")[0]
    if device != "lo":
        subprocess.run(["ip", "link", "del", device], capture_output=True)
"""


def _paths_under_tmp() -> list[str]:
    """The Python environment and this checkout, where they live under /tmp (a fresh clone in CI may)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, Path(__file__).resolve().parents[2])}
    return sorted(p for p in paths if p.startswith("/tmp/"))


LINK_PREFIX = "tsh"  # our end of a pair: tsh<pid of the test process>; its end: tsn<pid>
SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")  # unlikely to be in use; a free /30 is taken from it


def _run(cmd: Sequence[str], timeout_s: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)


def unavailable_reason() -> str | None:
    """None if this machine lets us make namespaces and a veth pair; otherwise why not (for a skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "needs root to make network namespaces and a veth pair"
    # what the holder does: the four namespaces, a hostname of its own, tmpfs mounts, loopback up
    inside = "hostname probe && mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm && ip link set lo up"
    probe = _run(["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", inside])
    if probe.returncode != 0:
        return f"cannot make net/uts/mount/pid namespaces with their own mounts: {probe.stderr.strip()}"
    name = f"tsp{os.getpid() % 100000}"
    try:
        made = _run(["ip", "link", "add", name + "a", "type", "veth", "peer", "name", name + "b"])
        if made.returncode != 0:
            return f"cannot make a veth pair: {made.stderr.strip()}"
    finally:
        _run(["ip", "link", "del", name + "a"])
    return None


def _remove_stale_links() -> None:
    """Our ends of veth pairs left by an earlier run that died before it could clean up (named after its pid)."""
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        device = line.split(":")[1].strip().split("@")[0]
        if re.fullmatch(rf"{LINK_PREFIX}\d+", device) and not Path(f"/proc/{device[len(LINK_PREFIX) :]}").exists():
            _run(["ip", "link", "del", device])


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of SUBNET_BASE that no interface of this machine has an address in (several runs at once
    each take their own)."""
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    used = [ipaddress.ip_interface(word).network for word in out.split() if "/" in word and word[0].isdigit()]
    subnets = list(SUBNET_BASE.subnets(new_prefix=30))
    first = os.getpid() % len(subnets)
    for subnet in subnets[first:] + subnets[:first]:
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError(f"no free /30 in {SUBNET_BASE}")


class SimulatedHost:
    """One per test process (its veth ends are named after the process id)."""

    def __init__(self, hostname: str, tmpfs_size: str = "1g") -> None:
        self.hostname = hostname
        self.subnet = subnet = _free_subnet()
        self.host_ip, self.ip = (str(a) for a in list(subnet.hosts())[:2])  # our side, its side
        self.prefix = subnet.prefixlen
        self.link = f"{LINK_PREFIX}{os.getpid()}"  # our end of the veth pair (names: 15 characters at most)
        self.peer = f"tsn{os.getpid()}"  # its end, moved into the namespace
        self._holder: subprocess.Popen | None = None
        self.pid = 0  # the namespace's init, as this (root) namespace numbers it
        self._tmpfs_size = tmpfs_size
        self.children: list[subprocess.Popen] = []
        self._stash: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SimulatedHost:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        _remove_stale_links()
        self._stash = tempfile.mkdtemp(prefix="tristage-host-tmp-", dir="/var/tmp")  # a mount point inside only
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
            + [sys.executable, "-c", _INIT, self.hostname, self._tmpfs_size, self._stash, *_paths_under_tmp()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = self._holder.stdout.readline()  # the init's "ready", or EOF if it failed
        if line.strip() != "ready":
            self._holder.kill()
            raise RuntimeError(f"the namespace holder did not start: {line}{self._holder.stderr.read()}")
        children = Path(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children").read_text().split()
        self.pid = int(children[0])
        self._check(["ip", "link", "add", self.link, "type", "veth", "peer", "name", self.peer, "netns", str(self.pid)])
        self._check(["ip", "addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.link])
        self._check(["ip", "link", "set", self.link, "up"])
        self._check(self._nsenter(["ip", "addr", "add", f"{self.ip}/{self.prefix}", "dev", self.peer]))
        self._check(self._nsenter(["ip", "link", "set", self.peer, "up"]))
        deadline = time.monotonic() + 10
        while not self.reachable():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.ip} does not answer over the veth pair")
            time.sleep(0.2)

    def reachable(self) -> bool:
        """The host answers a TCP connection attempt over the link (a refusal counts: it came back)."""
        with socket.socket() as s:
            s.settimeout(1.0)
            try:
                s.connect((self.ip, 9))  # discard: nothing listens there, so the host refuses at once
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
            return True

    def close(self) -> None:
        """Everything of the host ends (its init's exit kills the rest), and the veth pair is deleted."""
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        if self._holder is not None:
            with contextlib.suppress(OSError, ValueError):
                self._holder.stdin.close()  # the init kills the namespace's processes and exits
            try:
                self._holder.wait(10)
            except subprocess.TimeoutExpired:
                if self.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                self._holder.kill()
                self._holder.wait(10)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10)
        if self._stash is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._stash)  # empty out here: the bind mount was the namespace's alone
        # the namespace's end goes with the namespace, and ours with it; delete it ourselves all the same
        if _run(["ip", "link", "show", self.link]).returncode == 0:
            _run(["ip", "link", "del", self.link])

    # ------------------------------------------------------------------ inside the host

    def _nsenter(self, cmd: Sequence[str], cwd: str | None = None) -> list[str]:
        # every namespace of the init (net, uts, mount, pid, ...); nsenter forks so the command is in its PID
        # namespace; --wd: entering the mount namespace resets the working directory to its root
        return ["nsenter", "--target", str(self.pid), "--all", f"--wd={cwd or os.getcwd()}", "--", *cmd]

    def _check(self, cmd: Sequence[str]) -> None:
        result = _run(cmd)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        child = subprocess.Popen(self._nsenter(cmd, kwargs.pop("cwd", None)), **kwargs)
        self.children.append(child)
        return child

    def processes(self) -> dict[int, str]:
        """This host's processes but its init: {pid as our namespace numbers it: command line}."""
        own_ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != own_ns:
                    continue
                if (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                    continue
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
        return found

    def kill_all(self, timeout_s: float = 10.0) -> None:
        """The host crashes: SIGKILL to every one of its processes but its init (which reaps them), until
        none is left (one may have started another meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while processes := self.processes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the host survive SIGKILL: {processes}")
            for pid in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    # ------------------------------------------------------------------ the link

    def cut_link(self) -> None:
        """Pull the cable: the host's end of the veth pair goes down, ours loses its carrier, and nothing
        passes either way. Ours stays up on purpose: taken down, it would lose its connected route, and
        the host's address would go to the default gateway instead (some sandboxes' gateways accept any
        TCP connection); with no carrier the route stays and packets are dropped, as on a cut link."""
        self._check(self._nsenter(["ip", "link", "set", self.peer, "down"]))

    def restore_link(self) -> None:
        self._check(self._nsenter(["ip", "link", "set", self.peer, "up"]))
