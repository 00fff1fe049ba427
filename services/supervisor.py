"""`tristage serve`'s process tree: whatever kills the command, nothing of the cluster outlives it.

The cluster a local `tristage serve` starts is many processes: the server (Ray driver and gateway),
Ray's GCS, raylet, monitors and agents, and the worker actors. Ray's own fate-sharing does not
cover all of them (its agents are the raylet's children and survive it, re-parented to pid 1), and
a process killed with SIGKILL can clean nothing up itself. So the command is split in three:

    tristage serve        supervisor: the pid you hold. Forwards SIGINT/SIGTERM (SIGHUP as SIGTERM)
     │                    once to the watchdog, waits for it, exits with its status.
     └─ watchdog          its own process group (a terminal's Ctrl-C reaches only the supervisor,
         │                which forwards it once: a second copy would be uvicorn's "force exit").
         │                Forwards signals to the server; when the server exits, or the supervisor
         │                does (however it died), kills every process left below it.
         └─ server        services.serve.run: Ray (gcs_server, raylet ─ ray::* workers and agents,
                          monitors), the pools and the gateway; prints the URL once /ready answers.

Invariants:
- Both the supervisor and the watchdog are child subreapers (prctl PR_SET_CHILD_SUBREAPER): a
  process whose parent dies is re-parented to the nearest of them, never to pid 1. Every process
  the server ever started is therefore a descendant of the watchdog while it lives (of the
  supervisor after), whatever sessions or process groups Ray gives its processes.
- The supervisor holds the only write end of the lifeline pipe and never writes to it: the
  watchdog reads end-of-file exactly when the supervisor has exited, SIGKILL included.
- Cleanup is SIGKILL of every descendant, repeated until none is left (a process may fork while
  the others die), reaping each; the watchdog then exits. If the watchdog itself is killed, the
  supervisor (which inherits the orphans) does the same.
- The KV staging buffers are memfds (services.workers.kv_staging), so no /dev/shm file is left
  to remove: their memory goes with the last process holding them.

A clean stop (SIGTERM or Ctrl-C) is still the server's: it drains, stops the pools and Ray, and
exits 0; the watchdog only sweeps up what did not exit with it (Ray's agents ignore SIGTERM).
Used only when serve starts Ray itself: joined to a cluster (--ray-address), the actors belong to
the cluster and must outlive this gateway.

Tunables (defaults):
    WATCH_INTERVAL_S = 0.2   how often the watchdog reaps orphans and looks at the server and lifeline
    KILL_TIMEOUT_S = 10.0    how long cleanup keeps killing before it gives up (and says what is left)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from services.common.security import is_loopback

logger = logging.getLogger("tristage.supervisor")

WATCH_INTERVAL_S = 0.2
KILL_TIMEOUT_S = 10.0
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Ray's switch for clusters of one node: off, Ray takes the loopback address for the node's own (it
# otherwise turns even an explicit 127.0.0.1 into the host's routable address), and its GCS, raylet,
# object manager, workers' gRPC servers, agents and the autoscaler's metrics bind to it. Ray reads it
# when it is imported, so it must be in the server's environment before `import ray`.
RAY_SINGLE_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def local_ray_environ(data_plane_host: str) -> dict[str, str]:
    """The environment for a Ray this process starts: bound to loopback when the data plane is."""
    return dict(RAY_SINGLE_NODE_ENV) if is_loopback(data_plane_host) else {}


def supervise(run_server: Callable[[], int], environ: Mapping[str, str] | None = None) -> int:
    """Run `run_server` in a supervised child process (module docstring); returns its exit status.

    Call before anything starts threads or imports Ray: the children are forks of this process.
    """
    if environ and "ray" in sys.modules:  # Ray read its environment at import: these would come too late
        logger.warning("Ray was imported before the supervisor started: %s will not apply", sorted(environ))
    lifeline_read, lifeline_write = os.pipe()
    _become_subreaper()
    watchdog_pid = os.fork()
    if watchdog_pid == 0:  # the watchdog
        os.close(lifeline_write)
        os.setpgid(0, 0)
        _become_subreaper()
        os._exit(_Watchdog(lifeline_read).run(run_server, environ or {}))
    os.close(lifeline_read)
    # also here: a signal may come before the child's own call (which may have won: EACCES, or be gone)
    with contextlib.suppress(PermissionError, ProcessLookupError):
        os.setpgid(watchdog_pid, watchdog_pid)

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(watchdog_pid, signal.SIGTERM if signum == signal.SIGHUP else signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    _, status = os.waitpid(watchdog_pid, 0)
    code = _exit_code(status)
    if os.WIFSIGNALED(status):
        logger.error("the watchdog was killed (signal %d): stopping what it left", os.WTERMSIG(status))
    kill_descendants(os.getpid())  # nothing, unless the watchdog died before its own sweep
    os.close(lifeline_write)
    return code


class _Watchdog:
    """Between the supervisor and the server: forwards signals, and leaves no process behind."""

    def __init__(self, lifeline_fd: int) -> None:
        self._lifeline_fd = lifeline_fd
        self._supervisor_pid = os.getppid()
        self._server_pid = -1

    def run(self, run_server: Callable[[], int], environ: Mapping[str, str]) -> int:
        self._server_pid = os.fork()
        if self._server_pid == 0:
            os.close(self._lifeline_fd)
            os.environ.update(environ)
            os._exit(_run_to_exit_code(run_server))
        for signum in _FORWARDED:
            signal.signal(signum, self._forward)
        status = self._wait()
        kill_descendants(os.getpid())
        return 1 if status is None else _exit_code(status)

    def _forward(self, signum: int, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._server_pid, signum)

    def _wait(self) -> int | None:
        """The server's wait status once it exits; None if the supervisor went away first."""
        while True:
            readable, _, _ = select.select([self._lifeline_fd], [], [], WATCH_INTERVAL_S)
            status = _reap_children().get(self._server_pid)
            if status is not None:
                return status
            if readable:  # end of file: the supervisor is gone (it never writes)
                logger.warning("tristage serve (pid %d) is gone: stopping the cluster", self._supervisor_pid)
                return None


def _run_to_exit_code(run_server: Callable[[], int]) -> int:
    """The server's body in the forked child, as the exit status Python would give it at top level."""
    try:
        return run_server()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def kill_descendants(root_pid: int, timeout_s: float = KILL_TIMEOUT_S) -> None:
    """SIGKILL every process below `root_pid` (this process, a subreaper) until none is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap_children()
        alive = [pid for pid, state in descendants(root_pid).items() if state != "Z"]
        if not alive:
            _reap_children()
            return
        if time.monotonic() > deadline:
            logger.error("processes %s did not die within %.0f s", alive, timeout_s)
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def descendants(root_pid: int) -> dict[int, str]:
    """pid -> state letter (R, S, Z, ...) of every process below `root_pid`, from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        state, ppid = stat[stat.rindex(")") + 2 :].split(maxsplit=2)[:2]
        children.setdefault(int(ppid), []).append((int(entry.name), state))
    found: dict[int, str] = {}
    pending = [root_pid]
    while pending:
        for pid, state in children.get(pending.pop(), []):
            found[pid] = state
            pending.append(pid)
    return found


def _reap_children() -> dict[int, int]:
    """Reap every child that has exited (a subreaper's orphans included): pid -> wait status."""
    reaped: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = status


def _exit_code(wait_status: int) -> int:
    """A child's wait status as a shell reports it: its exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
