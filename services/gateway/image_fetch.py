"""Remote images: the allow-listed, SSRF-safe fetch of an http(s) image URL -> its body bytes.

It owns the URL checks that need no I/O (`parse_remote_url`, `host_is_allowed`,
`is_valid_host_pattern`), the address checks (`is_public_address`) and the fetch (`RemoteFetcher`);
checking the bytes is the caller's (services.gateway.images). Every hop of a fetch defends against
server-side request forgery (SSRF) in three steps:

    1. the URL's scheme must be http(s) and its host must be on the allow-list (before any I/O);
    2. the host is resolved once, and every address it resolves to must be public (not loopback,
       private, link-local, multicast, reserved or unspecified, also when IPv4 hides inside an IPv6
       address), unless `allow_private_networks`;
    3. the connection goes to those already-checked addresses (`_PinnedBackend`), so a second DNS
       answer cannot swap in an internal address (DNS rebinding). The Host header and the TLS
       server name stay the URL's host, so virtual hosting and certificate checks work unchanged.

Redirects are followed by hand, at most `max_redirects`, each hop through the same three steps. A
fetch has one deadline for all its hops, a byte cap on the body (a too-large Content-Length is
refused before the body is read; a body passing the cap is abandoned mid-stream) and needs a 2xx
answer. Bodies are asked for with `Accept-Encoding: identity`, so the cap counts the image's own bytes.
No proxy from the environment is ever used: httpcore, which does the HTTP here, reads no environment,
and the TLS context ignores SSL_CERT_* variables.

Failure policy: every refusal (a URL or host not allowed, a name that does not resolve, a non-public
address, a failed connection, a non-2xx answer, too many redirects, too many bytes, the deadline) is
an ImageRefused whose reason completes "image N ..."; the caller names the image and makes it an
InvalidRequestError (HTTP 400). A reason never carries a resolved address or a traceback. Nothing is
retried (a host's checked addresses are only tried in turn until one connects): the client may send
the request again.

Tunables (read from a `FetchPolicy`, which the gateway's ImagePolicy is; its defaults in brackets):
allowed_hosts [() : remote fetching off], allow_private_networks [False], fetch_timeout_s [10 s, for
DNS, every hop and the body together], max_redirects [3], max_bytes_per_image [20 MiB].
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import httpcore
import httpx

from services.common.images import ImageRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the IP addresses (as strings) the host resolves to; raises OSError when it cannot.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class FetchPolicy(Protocol):
    """The fields of the gateway's ImagePolicy that a remote fetch reads (meanings as listed above)."""

    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...
    @property
    def allow_private_networks(self) -> bool: ...
    @property
    def fetch_timeout_s(self) -> float: ...
    @property
    def max_redirects(self) -> int: ...
    @property
    def max_bytes_per_image(self) -> int: ...


# ----------------------------------------------------------------------------------------------
# URL checks (no I/O)

_REMOTE_SCHEMES = ("http", "https")


def parse_remote_url(url: str, policy: FetchPolicy, *, subject: str) -> httpx.URL:
    """The parsed URL when its scheme, form and host pass `policy`; raises ImageRefused.

    `subject` starts the reason: "has a URL" for the request's URL, "was redirected to a URL" for a hop.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ImageRefused(f"{subject} that cannot be parsed") from None
    if parsed.scheme not in _REMOTE_SCHEMES:
        shown = f"with scheme '{parsed.scheme}'" if parsed.scheme else "without a scheme"
        raise ImageRefused(f"{subject} {shown}; only data: URLs and http(s) URLs of allowed hosts are accepted")
    if not policy.allowed_hosts:
        raise ImageRefused(
            f"{subject} on a remote host, but this server does not fetch remote images; "
            "send the image inline as a data:image/...;base64 URL"
        )
    host = parsed.raw_host.decode("ascii")
    if not host or parsed.userinfo or (parsed.port is not None and not 0 < parsed.port < 65536):
        raise ImageRefused(f"{subject} with a missing host, credentials or an invalid port")
    if not host_is_allowed(host, policy.allowed_hosts):
        raise ImageRefused(f"{subject} whose host '{host}' is not on this server's list of allowed image hosts")
    return parsed


def host_is_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Exact, case-insensitive match, or "*.domain" for subdomains of domain (never the domain itself)."""
    host = _normalize_host(host)
    host_is_ip = _ip_literal(host) is not None
    for pattern in allowed_hosts:
        pattern = _normalize_host(pattern)
        if pattern.startswith("*."):
            if not host_is_ip and host.endswith(pattern[1:]):
                return True
        elif host == pattern or (host_is_ip and _ip_literal(host) == _ip_literal(pattern)):
            return True
    return False


def _normalize_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def is_valid_host_pattern(pattern: str) -> bool:
    """Whether an allowed_hosts entry is a host name, "*.domain" or an IP literal (not "*." + an IP)."""
    name = _normalize_host(pattern).removeprefix("*.")
    if _ip_literal(name) is not None:
        return not pattern.startswith("*.")
    return bool(name) and all(
        label and label.replace("-", "").isalnum() and label.isascii() for label in name.split(".")
    )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Address checks

_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """False for loopback, private, link-local, multicast, reserved, unspecified and non-global addresses.

    An IPv6 address that carries an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002::/16, NAT64
    64:ff9b::/96) is judged by the IPv4 address, which is where the packets end up.
    """
    if isinstance(address, ipaddress.IPv6Address):
        address = _embedded_ipv4(address) or address
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


async def resolve_host(host: str, port: int) -> list[str]:
    """The default Resolver: the system resolver, off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# ----------------------------------------------------------------------------------------------
# Remote fetching

_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# What httpcore raises when the connection or the peer fails (TLS failures arrive as ConnectError).
_FETCH_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException, httpcore.UnsupportedProtocol)
_REQUEST_HEADERS = [("Accept", "image/*"), ("Accept-Encoding", "identity"), ("User-Agent", "tristage-gateway")]


class RemoteFetcher:
    """Fetches allow-listed http(s) image URLs with the SSRF checks of the module docstring.

    Why httpcore and not httpx.AsyncClient: connecting to a pinned address while keeping the URL's
    host for the Host header and TLS needs a custom network backend, and httpx 0.28's transports do
    not accept one (encode/httpx#3749), while httpcore's network backends are public API. httpcore also
    never follows redirects and never reads proxy settings from the environment, which is what we want.

    `resolver` and `network_backend` are injectable: tests resolve names to chosen addresses and
    record (or reroute) every TCP connection. Safe to share between concurrent fetches.
    """

    def __init__(
        self, *, resolver: Resolver | None = None, network_backend: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._resolver = resolver or resolve_host
        self._network_backend = network_backend or httpcore.AnyIOBackend()
        self._ssl_context = httpx.create_ssl_context(trust_env=False)  # certifi's CAs, no SSL_CERT_* env

    async def fetch(self, url: str, policy: FetchPolicy) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch_following_redirects(url, policy), policy.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise ImageRefused(f"could not be fetched within {policy.fetch_timeout_s:g} s") from None

    async def _fetch_following_redirects(self, url: str, policy: FetchPolicy) -> bytes:
        target = parse_remote_url(url, policy, subject="has a URL")
        for _ in range(policy.max_redirects + 1):
            outcome = await self._fetch_once(target, policy)  # the body, or a redirect's Location
            if isinstance(outcome, bytes):
                return outcome
            target = parse_remote_url(_redirect_url(target, outcome), policy, subject="was redirected to a URL")
        raise ImageRefused(f"could not be fetched: it redirected more than {policy.max_redirects} times")

    async def _fetch_once(self, url: httpx.URL, policy: FetchPolicy) -> bytes | str:
        """One request: the body of a 2xx answer, or a redirect's Location as sent."""
        host = url.raw_host.decode("ascii")
        addresses = await self._public_addresses(host, url.port or _default_port(url), policy)
        backend = _PinnedBackend(host, addresses, self._network_backend)
        try:
            async with (
                httpcore.AsyncConnectionPool(
                    ssl_context=self._ssl_context, network_backend=backend, max_connections=1, retries=0
                ) as pool,
                pool.stream("GET", _core_url(url), headers=_request_headers(url)) as response,
            ):
                return await _read_answer(response, policy)
        except _FETCH_ERRORS:
            raise ImageRefused(f"could not be fetched: the connection to '{host}' failed") from None

    async def _public_addresses(self, host: str, port: int, policy: FetchPolicy) -> list[str]:
        """Every address `host` resolves to, each checked; the connection may only use these."""
        literal = _ip_literal(host)
        addresses = [literal] if literal is not None else await self._resolve(host, port)
        if not policy.allow_private_networks and not all(map(is_public_address, addresses)):
            raise ImageRefused(
                f"could not be fetched: the host '{host}' is on a loopback, private, link-local "
                "or otherwise non-public network, which this server does not fetch from"
            )
        return [str(address) for address in addresses]

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            addresses = [ipaddress.ip_address(address) for address in await self._resolver(host, port)]
        except (OSError, ValueError):  # socket.gaierror is an OSError
            addresses = []
        if not addresses:
            raise ImageRefused(f"could not be fetched: the host '{host}' could not be resolved")
        return addresses


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _core_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)


def _request_headers(url: httpx.URL) -> list[tuple[str, str]]:
    # netloc keeps IPv6 brackets and a non-default port, which httpcore's own Host header would not.
    # Accept-Encoding identity: the byte cap then counts the image's own bytes (no gzip bomb).
    return [("Host", url.netloc.decode("ascii")), *_REQUEST_HEADERS]


async def _read_answer(response: httpcore.Response, policy: FetchPolicy) -> bytes | str:
    if response.status in _REDIRECT_STATUSES:
        location = _header(response, b"location")
        if location is None:
            raise ImageRefused(f"could not be fetched: HTTP {response.status} without a Location header")
        return location.decode("latin-1")
    if not 200 <= response.status < 300:
        raise ImageRefused(f"could not be fetched: the server answered HTTP {response.status}")
    declared_bytes = _content_length(response)
    if declared_bytes is not None and declared_bytes > policy.max_bytes_per_image:
        raise ImageRefused(
            f"is {declared_bytes} bytes (its Content-Length); the limit is {policy.max_bytes_per_image} bytes"
        )
    return await _read_body_capped(response, policy.max_bytes_per_image)


def _redirect_url(base: httpx.URL, location: str) -> str:
    """Location resolved against the URL that answered it (it may be relative)."""
    try:
        return str(base.join(location))
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ImageRefused("could not be fetched: it redirected to a URL that cannot be parsed") from None


async def _read_body_capped(response: httpcore.Response, max_bytes: int) -> bytes:
    """The body, abandoned (and the connection closed) as soon as it passes max_bytes."""
    chunks, num_bytes = [], 0
    async for chunk in response.aiter_stream():
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise ImageRefused(f"is more than {max_bytes} bytes (the limit); the download was stopped")
        chunks.append(chunk)
    return b"".join(chunks)


def _header(response: httpcore.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key.lower() == name), None)


def _content_length(response: httpcore.Response) -> int | None:
    value = _header(response, b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects the one host of a request to its checked addresses, in order, and nowhere else.

    httpcore asks for a connection to the URL's host; this backend substitutes the addresses that
    were validated for it, so nothing resolves the name a second time. httpcore still passes the
    URL's host as the TLS server_hostname (SNI and certificate check) and the Host header is set
    from the URL, so only the TCP destination changes.
    """

    def __init__(self, host: str, addresses: Sequence[str], inner: httpcore.AsyncNetworkBackend) -> None:
        self._host = host
        self._addresses = list(addresses)
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host != self._host:  # invariant: one pool per request, so this never happens
            raise httpcore.ConnectError(f"no pinned address for {host!r}")
        last_error: Exception = httpcore.ConnectError("no address")
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image fetches never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
