"""What the gateway knows of its workers' restarts: how many, whether one is crash-looping, and why.

A worker counts its own restarts (WorkerInfo.num_restarts, kept across its processes by
services.workers.restarts), so the count is right even for restarts the gateway's health check
never saw (a worker that died and came back between two checks) and is the same on every gateway
replica. The gateway records each increase at the time it learns of it, in a RestartWindow
(services.common.restarts), and calls the worker crash-looping while the window holds
CRASH_LOOP_RESTARTS restarts or more: one error line naming the worker, its restart count and the
last error its death gave (Ray's RayActorError text from the health check), when it starts, and an
info line when it ends. The first info() of a worker sets its baseline (a gateway that attaches to
a shared pool does not count the restarts that happened before it came).

/health is unaffected (the gateway process lives); /ready stays "some engine worker can serve".

Not thread-safe: one owner, the gateway's event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.common.restarts import RestartWindow

logger = logging.getLogger(__name__)


@dataclass
class _Worker:
    stage: str
    num_restarts: int | None = None  # as of its last info(); None until the first
    window: RestartWindow = field(default_factory=RestartWindow)
    last_error: str = ""
    crash_looping: bool = False


class WorkerRestarts:
    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}

    def add_worker(self, name: str, stage: str) -> None:
        self._workers[name] = _Worker(stage)

    def on_info(self, name: str, num_restarts: int, now_s: float) -> None:
        """A worker answered info(): record the restarts since its last answer."""
        worker = self._workers[name]
        if worker.num_restarts is not None and num_restarts > worker.num_restarts:
            worker.window.record(now_s, num_restarts - worker.num_restarts)
        worker.num_restarts = num_restarts
        self._update(name, worker, now_s)

    def on_down(self, name: str, error: str) -> None:
        """The health check found the worker gone: its error is the likeliest reason of its next restart."""
        self._workers[name].last_error = error

    def snapshot(self, now_s: float) -> dict[tuple[str, str], tuple[int, bool]]:
        """(stage, worker) -> (restarts so far, crash-looping now)."""
        return {
            (w.stage, name): (w.num_restarts or 0, w.window.crash_looping(now_s)) for name, w in self._workers.items()
        }

    def _update(self, name: str, worker: _Worker, now_s: float) -> None:
        looping = worker.window.crash_looping(now_s)
        if looping and not worker.crash_looping:
            logger.error(
                "worker %s is crash-looping: %d restarts within %.0f s (%d in all); last error: %s",
                name,
                worker.window.num_recent(now_s),
                worker.window.window_s,
                worker.num_restarts,
                worker.last_error or "unknown (it died between two health checks)",
            )
        elif worker.crash_looping and not looping:
            logger.info("worker %s is no longer crash-looping (%d restarts in all)", name, worker.num_restarts)
        worker.crash_looping = looping
