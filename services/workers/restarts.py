"""A worker actor's restarts, remembered across its processes, and the backoff before it loads again.

Ray restarts a dead actor without limit (services.workers.pool: max_restarts=-1) by running its
constructor again in a new process, which knows only whether it is a restart
(`was_current_actor_reconstructed`), not how many there were or when. So each start writes down
its time in Ray's key-value store (kept by the GCS, reachable from every node), under the actor's
id, which stays the same across restarts and is unique in the cluster:

    key  tristage-restarts:<actor id>   value  {"num_restarts": n, "times_s": [restarts within WINDOW_S]}

Only one process of an actor runs at a time, and only its constructor writes the key, so the
read-modify-write needs no lock. The backoff and crash-loop rule is services.common.restarts'.
A key outlives its actor (a few bytes for each actor the cluster ever had; gone with the cluster).
"""

from __future__ import annotations

import json
import logging
import time

import ray
from ray.experimental import internal_kv

from services.common.restarts import CRASH_LOOP_RESTARTS, WINDOW_S, RestartWindow, restart_backoff_s

logger = logging.getLogger(__name__)

_KEY_PREFIX = "tristage-restarts:"


def back_off_if_restarted(name: str) -> int:
    """Call first in a worker actor's constructor: record this start and, on a restart, wait its backoff
    (services.common.restarts) before the model loads. Returns the actor's restarts so far."""
    context = ray.get_runtime_context()
    if not context.was_current_actor_reconstructed:
        return 0
    actor_id = context.get_actor_id()
    assert actor_id is not None  # reconstructed: this is an actor
    key = _KEY_PREFIX + actor_id
    now_s = time.time()  # wall clock: the next process may run on another node
    num_restarts, window = _read(key)
    num_restarts += 1
    window.record(now_s)
    internal_kv._internal_kv_put(
        key, json.dumps({"num_restarts": num_restarts, "times_s": window.recent_times_s(now_s)})
    )
    num_recent = window.num_recent(now_s)
    delay_s = restart_backoff_s(num_recent)
    log = logger.error if num_recent >= CRASH_LOOP_RESTARTS else logger.warning
    log(
        "worker %s restarted (restart %d, %d within %.0f s%s): loading again in %.0f s",
        name,
        num_restarts,
        num_recent,
        WINDOW_S,
        ", crash-looping" if num_recent >= CRASH_LOOP_RESTARTS else "",
        delay_s,
    )
    time.sleep(delay_s)
    return num_restarts


def _read(key: str) -> tuple[int, RestartWindow]:
    raw = internal_kv._internal_kv_get(key)
    if raw is None:  # the first restart
        return 0, RestartWindow()
    record = json.loads(raw)
    return int(record["num_restarts"]), RestartWindow(times_s=record["times_s"])
