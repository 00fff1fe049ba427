"""The global placement service: a prefix index fed by KV events, a load view, routing policies."""

from services.router.index import FIRST_EVENT_SEQ, ContentIndex, PrefixIndex
from services.router.load import LoadView, WorkerLoad
from services.router.router import (
    POLICIES,
    NoRoomNow,
    NoWorkerAvailable,
    Placement,
    Router,
    RouterConfig,
    RouteRequest,
    RouterStats,
)

__all__ = [
    "FIRST_EVENT_SEQ",
    "POLICIES",
    "ContentIndex",
    "LoadView",
    "NoRoomNow",
    "NoWorkerAvailable",
    "Placement",
    "PrefixIndex",
    "RouteRequest",
    "Router",
    "RouterConfig",
    "RouterStats",
    "WorkerLoad",
]
