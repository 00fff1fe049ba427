"""The Host allow-list: a request whose Host header names a host not on the list gets a 400.

Why: a server on 127.0.0.1 is reachable from any web page its user opens, through DNS rebinding
(the page's own name is re-resolved to 127.0.0.1, so the browser treats the server as that page's
origin and lets the page read the answers); such requests still carry the page's name in `Host`.
Refusing names the server is not known by closes that door; API keys close it too, but they are
off by default.

    allowed_hosts (GatewayConfig)   None: any Host. Otherwise names compared case-insensitively,
                                    without the port and a trailing dot; "*.example.com" matches
                                    the subdomains of example.com; "*" matches anything

`tristage serve` default (`default_allowed_hosts`): bound to a loopback address, only loopback names
(localhost, 127.0.0.1, ::1 and the bound address), since nothing else can name it legitimately;
bound to any other address, any Host, since the names a server is reached by over a network
(pod IPs, Service and load-balancer names) are not known to it; `--allowed-hosts` sets the list.

/health and /ready are exempt: they disclose nothing, and probes name the server by whatever
address they reach (the kubelet sends the pod's IP).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.security import is_loopback
from services.gateway.errors import ApiError

LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
PROBE_PATHS = frozenset({"/health", "/ready"})


def default_allowed_hosts(bind_host: str) -> tuple[str, ...] | None:
    """The loopback names when `bind_host` is a loopback address or name, else None (any Host)."""
    if not is_loopback(host_name(bind_host)):
        return None
    return tuple(dict.fromkeys((*LOOPBACK_HOST_NAMES, host_name(bind_host))))


def host_name(value: str) -> str:
    """The host of a Host header value (or of a list entry): lower case, without port, brackets
    ("[::1]:8000" -> "::1") or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, _ = value.rpartition(":")
    if not colon or ":" in name:  # no port, or a bare IPv6 address
        name = value
    return name.rstrip(".")


class HostAllowList:
    def __init__(self, allowed_hosts: tuple[str, ...]) -> None:
        patterns = [entry.strip().lower() for entry in allowed_hosts]
        bad = [p for p in patterns if p.startswith("*") and p != "*" and not p.startswith("*.")]
        if bad or not all(patterns):
            raise ValueError(f"allowed hosts must be names, '*.domain' or '*'; not {bad or ['']}")
        self._any = "*" in patterns
        self._names = frozenset(host_name(p) for p in patterns if not p.startswith("*"))
        self._suffixes = tuple(host_name(p[1:]) for p in patterns if p.startswith("*."))  # ".example.com"

    def allows(self, host_header: str) -> bool:
        if self._any:
            return True
        name = host_name(host_header)
        return bool(name) and (name in self._names or name.endswith(self._suffixes))


class HostCheckMiddleware:
    """Answers 400 (OpenAI's shape, naming the Host header) to an HTTP request whose Host, or lack
    of one, the list does not allow, before anything else runs."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self._app = app
        self._allow_list = HostAllowList(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
            hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
            if len(hosts) != 1 or not self._allow_list.allows(hosts[0]):
                await _host_error(hosts).response()(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _host_error(hosts: list[str]) -> ApiError:
    if not hosts:
        message = "The request has no Host header; this server requires one naming an allowed host."
    elif len(hosts) > 1:
        message = "The request has more than one Host header."
    else:
        message = f"Invalid Host header {hosts[0][:256]!r}: this server does not answer to that host name."
    return ApiError(400, message, code="invalid_host")
