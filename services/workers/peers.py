"""The addresses a worker may connect to on the data plane: only those gateways registered over Ray.

Invariant: a worker opens a connection only to an address a gateway told it about through the control
plane (Ray calls, which are authenticated). Messages on the data plane name addresses too (a
request's reply_to, its KV target, a transfer's ack_to, an image's deliver_to); without this check a
forged message would make the worker connect out and, once that peer stops reading and the send
queue fills, block its loop. A message naming an address not registered here is dropped, logged
once per address, and counted (`num_refused`).

    gateway A ──register(DataPlanePeers: A's results address, every worker's addresses)──▶ ┐
    gateway B ──register(...)──────────────────────────────────────────────────────────────▶ ├ allowed =
                                                                                              ┘ union of the
                                                                    latest registration of each gateway

Each gateway's registration replaces its own previous one (a restarted peer's old addresses leave
with it) and leaves the other gateways' alone; a gateway that closes unregisters itself. At most
`max_gateways` registrations are kept (the least recently registered is forgotten first), so
gateways that died without unregistering cannot grow the table for ever.

Threads: Ray's threads call register / unregister, the worker's loop calls `allows`; the allowed
sets are rebuilt under a lock and swapped in whole, so the loop reads one consistent snapshot
without taking the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Literal

from services.common.messages import DataPlanePeers

logger = logging.getLogger(__name__)

PeerKind = Literal["reply", "ack", "kv", "embedding"]
MAX_GATEWAYS = 64
MAX_WARNED_ADDRESSES = 1024  # refused addresses logged by name (each once); later ones are only counted


def _allowed_sets(registrations: list[DataPlanePeers]) -> dict[PeerKind, frozenset[str]]:
    return {
        "reply": frozenset(p.reply_address for p in registrations),
        "ack": frozenset(a for p in registrations for a in p.input_addresses),
        "kv": frozenset(a for p in registrations for a in p.kv_addresses),
        "embedding": frozenset(a for p in registrations for a in p.embedding_addresses),
    }


class PeerRegistry:
    def __init__(self, owner: str = "worker", max_gateways: int = MAX_GATEWAYS) -> None:
        self.owner = owner
        self.max_gateways = max_gateways
        self.num_refused = 0  # messages dropped for naming an unregistered address (total)
        self._lock = threading.Lock()
        self._by_gateway: OrderedDict[str, DataPlanePeers] = OrderedDict()  # reply address -> registration
        self._allowed = _allowed_sets([])
        self._warned: set[str] = set()

    def register(self, peers: DataPlanePeers) -> None:
        """A gateway's current view of the cluster (replaces what that gateway registered before)."""
        with self._lock:
            self._by_gateway.pop(peers.reply_address, None)
            self._by_gateway[peers.reply_address] = peers
            while len(self._by_gateway) > self.max_gateways:
                self._by_gateway.popitem(last=False)
            self._allowed = _allowed_sets(list(self._by_gateway.values()))

    def unregister(self, reply_address: str) -> None:
        """A gateway going away: its results address (and what only it vouched for) is no longer allowed."""
        with self._lock:
            if self._by_gateway.pop(reply_address, None) is not None:
                self._allowed = _allowed_sets(list(self._by_gateway.values()))

    def allows(self, kind: PeerKind, address: str, request_id: str = "") -> bool:
        """Whether the worker may connect to `address` for `kind`; a refusal is counted (and logged the
        first time for each address), and the caller drops the message."""
        if address in self._allowed[kind]:
            return True
        self.num_refused += 1
        if address not in self._warned and len(self._warned) < MAX_WARNED_ADDRESSES:
            self._warned.add(address)
            logger.warning(
                "%s dropped %s: its %s address %r was not registered by any gateway (forged, or from a "
                "gateway this worker does not know); nothing connects to it",
                self.owner,
                request_id or "a message",
                kind,
                address[:200],
            )
        return False
