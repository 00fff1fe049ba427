"""Worker restarts: how long a restarted worker waits before it loads again, and when a worker is
crash-looping. Bookkeeping over timestamps in seconds (one clock per instance); no Ray, no I/O.

Ray restarts a dead worker actor as often as it dies (max_restarts=-1). Two users, one rule:

- the worker itself (services.workers.restarts): each restart records its time; a restart with r
  restarts within WINDOW_S (itself included) waits restart_backoff_s(r) before it loads its model,
  so a worker that dies at once every time reloads every BACKOFF_MAX_S at most, not in a tight loop;
- the gateway (services.gateway.worker_restarts): each restart it learns of (a WorkerInfo whose
  num_restarts grew) is recorded per worker; CRASH_LOOP_RESTARTS restarts within WINDOW_S make the
  worker crash-looping (logged with its last error; tristage:worker_crash_looping = 1) until the
  window holds fewer again.

    restarts within WINDOW_S   1    2    3    4    5    6   ...
    backoff before loading     0    1    2    4    8    16  ... s, at most BACKOFF_MAX_S

Tunables (defaults):
    WINDOW_S = 300.0          restarts older than this are forgotten (a model load takes minutes at most)
    CRASH_LOOP_RESTARTS = 3   restarts within WINDOW_S that make a crash loop
    BACKOFF_FIRST_S = 1.0     the wait of the second restart within the window; the first waits nothing
                              (one crash is an accident, and the worker's requests are waiting for it)
    BACKOFF_MAX_S = 60.0
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

WINDOW_S = 300.0
CRASH_LOOP_RESTARTS = 3
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


def restart_backoff_s(num_recent_restarts: int) -> float:
    """Seconds a worker waits before loading, on its restart number `num_recent_restarts` within the window."""
    if num_recent_restarts <= 1:
        return 0.0
    return min(BACKOFF_FIRST_S * 2.0 ** (num_recent_restarts - 2), BACKOFF_MAX_S)


class RestartWindow:
    """One worker's restart times within the last `window_s`, and its restarts over its whole life."""

    def __init__(
        self, window_s: float = WINDOW_S, crash_loop_restarts: int = CRASH_LOOP_RESTARTS, times_s: Iterable[float] = ()
    ) -> None:
        self.window_s = window_s
        self.crash_loop_restarts = crash_loop_restarts
        self._times_s: deque[float] = deque(sorted(times_s))

    def record(self, now_s: float, num_restarts: int = 1) -> None:
        self._times_s.extend([now_s] * num_restarts)

    def num_recent(self, now_s: float) -> int:
        while self._times_s and self._times_s[0] <= now_s - self.window_s:
            self._times_s.popleft()
        return len(self._times_s)

    def crash_looping(self, now_s: float) -> bool:
        return self.num_recent(now_s) >= self.crash_loop_restarts

    def recent_times_s(self, now_s: float) -> list[float]:
        self.num_recent(now_s)
        return list(self._times_s)
