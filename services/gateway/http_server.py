"""The gateway's connection limits, applied where uvicorn accepts connections.

    max_connections        connections served at once (GatewayConfig, default 2048). A connection
                           past the cap is refused at once: the request it sends gets an OpenAI-shaped
                           503 with Retry-After and `Connection: close` (REFUSAL_HEAD_WAIT_S for its
                           request head to arrive, else it is just closed); it never reaches the app
    header_read_timeout_s  seconds a request head may take to arrive (default 10), counted from the
                           connection's opening, or from the first byte of a later request on a kept-
                           alive connection; then the connection is closed
    keep_alive_timeout_s   seconds an idle kept-alive connection stays open (uvicorn's
                           timeout_keep_alive; default 5)

With the body's own deadline (GatewayConfig.body_read_timeout_s: 408 and close, in the app), a
client that stops sending gives up its connection within a timeout wherever it stalls.

Why not uvicorn's `limit_concurrency`: it counts open connections and running requests against one
number, looks at it only once a request head has arrived (and uvicorn has no head timeout: a client
that connects and sends nothing, or half a head, keeps its connection, and so its slot, forever),
and answers a plain-text 503 without Retry-After.

The protocol subclasses the one uvicorn would pick (httptools when installed, else h11), using
only what both share: `app` (the ASGI app for this connection's requests) and `cycle` (the request
being served; a new object per request head).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError

REFUSAL_HEAD_WAIT_S = 1.0  # a refused connection's request head gets this long to arrive for its 503


class ConnectionCap:
    """Open connections against `max_connections`. Called on the event loop thread only."""

    def __init__(self, max_connections: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.max_connections = max_connections
        self.num_open = 0
        self._on_refused = on_refused

    def try_open(self) -> bool:
        if self.num_open >= self.max_connections:
            self._on_refused()
            return False
        self.num_open += 1
        return True

    def close(self) -> None:
        self.num_open -= 1


def refusal_app(max_connections: int, retry_after_s: int) -> ASGIApp:
    return ApiError(
        503,
        f"The server has reached its limit of {max_connections} open connections. Please retry shortly.",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s), "Connection": "close"},
    ).response()


def capped_protocol(
    cap: ConnectionCap, header_read_timeout_s: float, refusal: ASGIApp, base: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """An HTTP protocol class for uvicorn that counts its connection against `cap`, and closes a
    connection whose request head does not arrive within `header_read_timeout_s`."""

    class CappedHTTPProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._last_cycle = None
            self._counted = cap.try_open()
            if not self._counted:
                self.app = refusal
            self._await_head(header_read_timeout_s if self._counted else REFUSAL_HEAD_WAIT_S)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            if self._counted:
                self._counted = False
                cap.close()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._last_cycle:  # a request head arrived
                self._last_cycle = self.cycle
                self._stop_head_timer()
            elif self._between_requests() and self._head_timer is None:  # the start of the next head
                self._await_head(header_read_timeout_s)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _await_head(self, timeout_s: float) -> None:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(timeout_s, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return CappedHTTPProtocol


def uvicorn_options(app: FastAPI) -> dict[str, Any]:
    """The uvicorn.Config keyword arguments that apply the connection limits of `app` (from create_app)."""
    config: GatewayConfig = app.state.config
    cap: ConnectionCap = app.state.connections
    return {
        "http": capped_protocol(
            cap, config.header_read_timeout_s, refusal_app(config.max_connections, config.retry_after_s)
        ),
        "timeout_keep_alive": config.keep_alive_timeout_s,
        "limit_concurrency": None,  # see the module doc
        # no WebSocket routes; and an upgraded connection would leave the protocol without
        # connection_lost, so its slot in the cap would never come back
        "ws": "none",
    }
