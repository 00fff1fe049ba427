"""ZeroMQ sockets for the data plane: bound to configured addresses only, bounded message sizes,
optionally authenticated.

Addresses are ZeroMQ endpoints. `tcp://HOST:0` binds a free port on HOST (loopback by default,
never every interface unless the configuration says so); the socket's real endpoint is returned so
it can be handed to peers through the control plane (Ray).

Authentication (services.common.security): `bind` makes a socket a CURVE server and `connect` a
CURVE client when given the cluster's keys; None keeps them plain. The binding side is always the
server, so the side that names an address (and may be told a wrong one) is the one that must prove
it belongs to the cluster, and every listening socket refuses strangers.

Size limits: `configure` sets each socket's largest inbound frame (ZMQ_MAXMSGSIZE: a peer that sends
more is disconnected before the frame is buffered). Each receiving socket passes the largest frame
its messages can legitimately have; the reason for each limit sits where the socket is made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TypeVar

import zmq

from services.common.codec import MAX_HEADER_BYTES, DecodeError, MessageCodec
from services.common.security import CurveKeys, curve_client, curve_server

logger = logging.getLogger(__name__)

DEFAULT_BIND_HOST = "127.0.0.1"
SEND_HIGH_WATER_MARK = 10_000  # messages queued per peer before send blocks (bounded memory)

SocketT = TypeVar("SocketT", bound=zmq.Socket[object])  # a blocking or an asyncio socket
T = TypeVar("T")


def bind(socket: zmq.Socket[object], address: str, keys: CurveKeys | None = None) -> str:
    """Bind `socket` to `address` (port 0 means any free port), as a CURVE server when given the cluster's
    `keys`; return the endpoint actually bound."""
    curve_server(socket, keys)
    if address.startswith("tcp://") and address.endswith(":0"):
        host = address[len("tcp://") : -len(":0")]
        port = socket.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    socket.bind(address)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def connect(socket: SocketT, address: str, keys: CurveKeys | None = None) -> SocketT:
    """Connect `socket` to `address`, as a CURVE client when given the cluster's `keys`."""
    curve_client(socket, keys)
    socket.connect(address)
    return socket


def configure(socket: SocketT, max_message_bytes: int = MAX_HEADER_BYTES) -> SocketT:
    """Common options: drop unsent messages on close, bound queues, refuse oversized messages."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
    socket.setsockopt(zmq.RCVHWM, SEND_HIGH_WATER_MARK)
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return socket


def tcp_address(host: str = DEFAULT_BIND_HOST, port: int = 0) -> str:
    return f"tcp://{host}:{port}"


def drain(socket: zmq.Socket[bytes], codec: MessageCodec[T], owner: str) -> Iterator[tuple[T, list[bytes]]]:
    """(message, frames) for each message waiting on `socket`, without blocking; a malformed one is
    logged (naming `owner`) and skipped, never raised. Lazy: a caller that stops iterating leaves the
    rest queued (that is how a full consumer holds its senders back)."""
    while True:
        try:
            frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return
        try:
            message = codec.decode(frames)
        except DecodeError as exc:
            logger.warning("%s dropped a malformed message: %s", owner, exc)
            continue
        yield message, frames
