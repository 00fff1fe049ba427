"""Image intake: the URLs of OpenAI `image_url` content parts -> decoded RGB images, safely.

Two kinds of URL are accepted; everything else (file:, ftp:, gopher:, a bare path, ...) is refused:

    data:image/<fmt>;base64,<payload>   inline; strict base64; size checked before decoding
    http(s)://host/...                  only hosts on `ImagePolicy.allowed_hosts` (empty by default:
                                        remote fetching is off until an operator lists hosts)

Remote fetches defend against server-side request forgery (SSRF) in three steps per hop:

    1. the URL's scheme must be http(s) and its host must be on the allow-list (before any I/O);
    2. the host is resolved once, and every address it resolves to must be public (not loopback,
       private, link-local, multicast, reserved or unspecified, also when IPv4 hides inside an IPv6
       address), unless `allow_private_networks`;
    3. the connection goes to those already-checked addresses (`_PinnedBackend`), so a second DNS
       answer cannot swap in an internal address (DNS rebinding). The Host header and the TLS
       server name stay the URL's host, so virtual hosting and certificate checks work unchanged.

Redirects are followed by hand, at most `max_redirects`, each hop through the same three steps. A
fetch has one deadline for all its hops, a byte cap on the body and needs a 2xx answer. No proxy
from the environment is ever used: httpcore, which does the HTTP here, reads no environment.

A part may carry a `uuid` (as in vLLM): the client's name for its image. The gateway keeps the bytes
of images sent with one (`ImageReferences`, LRU within a byte budget, scoped to the API key and
cache_salt), and a later part with the uuid and no image_url reuses them: the client uploads a large
image once. A uuid never changes an image's identity, which stays the hash of its bytes; the first
image of a request sent under a uuid is the one it names.

Decoding, with its bomb and truncation checks, is services.common.images (the encode workers decode
with it too); the gateway decodes every new image once to check it, and remembers the sizes of bytes
it has checked (`ValidatedImages`).

Tunables (`ImagePolicy`, defaults in brackets): max_images_per_request [8], max_bytes_per_image
[20 MiB], max_pixels_per_image [4096*4096], max_side_px [8192], fetch_timeout_s [10 s],
max_redirects [3], allowed_hosts [()], allow_private_networks [False],
accepted_formats [PNG, JPEG, WEBP, GIF, BMP].

Every refusal is an InvalidRequestError (HTTP 400) whose message names the image (numbered from 1
in request order), what was wrong and the limit; it never carries a resolved address or a traceback.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import httpcore
import httpx
import pybase64

from services.common.errors import InvalidRequestError
from services.common.images import (
    ImageLimits,
    ImageRefused,
    LoadedImage,
    ValidatedImages,
    check_and_decode,
    invalid_image,
)
from services.common.lru import BytesLRU

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the IP addresses (as strings) the host resolves to; raises OSError when it cannot.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


@dataclass(frozen=True)
class ImagePolicy(ImageLimits):
    """The decoding limits (ImageLimits) and what the gateway adds: images per request and remote fetches."""

    max_images_per_request: int = 8
    fetch_timeout_s: float = 10.0  # one deadline per remote image, covering DNS, redirects and body
    max_redirects: int = 3  # redirects followed per remote image; each hop is checked like the first
    # Hosts remote images may come from: exact names, case-insensitive, in ASCII (punycode) form, or
    # "*.example.com" for any subdomain of example.com (not example.com itself). IP literals match
    # exactly. Empty: http(s) image URLs are refused.
    allowed_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False  # True lets allowed hosts resolve to internal addresses

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_images_per_request < 1:
            raise ValueError("max_images_per_request must be at least 1")
        if self.fetch_timeout_s <= 0:
            raise ValueError("fetch_timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        for pattern in self.allowed_hosts:
            if not _is_valid_host_pattern(pattern):
                raise ValueError(f"allowed_hosts: {pattern!r} is not a host name, '*.domain' or an IP address")


@dataclass(frozen=True)
class ImageSource:
    """Where one image_url part's image comes from.

    A URL, optionally named by the client's `uuid` (as vLLM's image parts are), so that a later request
    may send the uuid alone and skip uploading the bytes again; or a uuid alone, naming such an image.
    The uuid only names: the image's identity for every cache stays the hash of its bytes, so a client
    reusing another's uuid can never make the other's request see its image (references are also
    scoped, see `reference_scope`).
    """

    url: str | None
    uuid: str | None = None

    def __post_init__(self) -> None:
        if self.url is None and self.uuid is None:
            raise ValueError("an image source needs a url or a uuid")


def reference_scope(credential: str | None, cache_salt: str | None) -> bytes:
    """Who may name an image by uuid: the bearer credential and cache_salt it was sent with, hashed
    (the key itself is never kept)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (credential, cache_salt):
        encoded = (part or "").encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)  # length-prefixed: no ambiguity
    return digest.digest()


class ImageReferences:
    """(scope, uuid) -> the image last sent under that uuid in that scope: its content hash, size and
    encoded bytes (no pixels), least recently used first out once their bytes pass `capacity_bytes`.

    A request naming the uuid alone gets these bytes sent on to the encoders as if it had uploaded them,
    so nothing downstream depends on whether an encoder still holds the embedding. Thread-safe.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self._images: BytesLRU[tuple[bytes, str], LoadedImage] = BytesLRU(capacity_bytes, lambda i: len(i.data))
        self._lock = threading.Lock()

    @property
    def num_bytes(self) -> int:
        """Encoded bytes held."""
        return self._images.num_bytes

    def get(self, scope: bytes, uuid: str) -> LoadedImage | None:
        with self._lock:
            return self._images.get((scope, uuid))

    def put(self, scope: bytes, uuid: str, image: LoadedImage) -> None:
        kept = replace(image, image=None)  # the pixels are the encoders' business
        with self._lock:
            self._images.put((scope, uuid), kept)

    def __len__(self) -> int:
        return len(self._images)


class ImageFetcher(Protocol):
    async def fetch(self, url: str, policy: ImagePolicy) -> bytes:
        """The body behind an http(s) URL, checked against `policy`; raises ImageRefused."""
        ...


# ----------------------------------------------------------------------------------------------
# The entry points


async def load_images(sources: Sequence[str | ImageSource], policy: ImagePolicy, *,
                      fetcher: ImageFetcher | None = None, param: str = "messages",
                      validated: ValidatedImages | None = None, references: ImageReferences | None = None,
                      scope: bytes = b"") -> list[LoadedImage]:
    """Decoded images in the order of `sources` (URLs, or ImageSources that may name an image by uuid);
    raises InvalidRequestError(param=param) for the first bad one.

    Every check that needs no I/O runs on all sources before any fetch starts, including that each
    uuid without a URL names an image of this request or of `references` under `scope`. Remote images
    are fetched concurrently; decoding runs in worker threads so the event loop never decodes pixels.
    When one image fails, the others' fetches are cancelled. Once all are loaded, every uuid with a
    URL is recorded in `references`. Pass one long-lived `RemoteFetcher` as `fetcher` in a server: the
    default builds a new one (and its TLS context) per call.
    """
    if len(sources) > policy.max_images_per_request:
        raise InvalidRequestError(f"a request may carry at most {policy.max_images_per_request} images, "
                                  f"not {len(sources)}", param=param)
    sources = [ImageSource(s) if isinstance(s, str) else s for s in sources]
    labels = [f"image {index + 1}" for index in range(len(sources))]
    sent = {s.uuid: i for i, s in reversed(list(enumerate(sources))) if s.url is not None and s.uuid is not None}
    earlier: dict[int, LoadedImage] = {}  # image index -> the image a uuid named in an earlier request
    for index, (label, source) in enumerate(zip(labels, sources)):
        if source.url is not None:
            try:
                _precheck_url(source.url, policy)
            except ImageRefused as exc:
                raise invalid_image(label, exc, param) from None
        elif source.uuid not in sent:
            found = references.get(scope, source.uuid) if references is not None else None
            if found is None:
                raise InvalidRequestError(
                    f"{label} names uuid {source.uuid!r} without an image_url, and no image was sent under that "
                    "uuid recently by this API key and cache_salt (or it has been evicted); send it again with "
                    "its image_url", param=param)
            earlier[index] = found
    urls = {index: s.url for index, s in enumerate(sources) if s.url is not None}
    if fetcher is None and not all(_is_data_url(url) for url in urls.values()):
        fetcher = RemoteFetcher()
    loaded = dict(zip(urls, await _gather_or_cancel(
        _load_one(labels[index], url, policy, fetcher, param, validated) for index, url in urls.items())))
    images = [loaded[i] if i in loaded else earlier[i] if i in earlier else loaded[sent[s.uuid]]
              for i, s in enumerate(sources)]
    if references is not None:
        for uuid, index in sent.items():
            references.put(scope, uuid, images[index])
    return images


async def _load_one(label: str, url: str, policy: ImagePolicy, fetcher: ImageFetcher | None,
                    param: str, validated: ValidatedImages | None = None) -> LoadedImage:
    try:
        if _is_data_url(url):
            return await asyncio.to_thread(_decode_data_url, url, policy, validated)
        assert fetcher is not None  # load_images builds one whenever a URL is remote
        data = await fetcher.fetch(url, policy)
        return await asyncio.to_thread(check_and_decode, data, policy, validated)
    except ImageRefused as exc:
        raise invalid_image(label, exc, param) from None


async def _gather_or_cancel(coroutines: Iterable[Awaitable[LoadedImage]]) -> list[LoadedImage]:
    """asyncio.gather, except that the first failure cancels the loads still running."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for tasks already done


# ----------------------------------------------------------------------------------------------
# data: URLs


def _is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def _decode_data_url(url: str, policy: ImagePolicy, validated: ValidatedImages | None = None) -> LoadedImage:
    return check_and_decode(_data_url_bytes(url, policy), policy, validated)


def _data_url_bytes(url: str, policy: ImagePolicy) -> bytes:
    """The payload of `data:<mime>[;params];base64,<payload>`, size-checked before it is decoded."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageRefused("has a malformed data URL: there is no ',' before the payload")
    media_type, *params = [part.strip().lower() for part in header.split(";")]
    if not media_type.startswith("image/"):
        shown = media_type or "text/plain (the default when none is given)"
        raise ImageRefused(f"has a data URL of MIME type '{shown}'; only image types are accepted")
    if "base64" not in params:
        raise ImageRefused("has a data URL that is not base64-encoded; use data:image/<format>;base64,<payload>")
    num_bytes = _base64_num_bytes(payload)
    if num_bytes > policy.max_bytes_per_image:
        raise ImageRefused(f"is {num_bytes} bytes; the limit is {policy.max_bytes_per_image} bytes")
    try:
        return pybase64.b64decode(payload, validate=True)  # the standard library's rules, vectorised
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ImageRefused("has a data URL whose payload is not valid base64 "
                           "(standard alphabet, padded, no whitespace)") from None


def _base64_num_bytes(payload: str) -> int:
    """Bytes that a well-formed base64 payload decodes to: 3 per 4 characters, less the padding."""
    return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))


# ----------------------------------------------------------------------------------------------
# URL checks (no I/O)

_REMOTE_SCHEMES = ("http", "https")


def _precheck_url(url: str, policy: ImagePolicy) -> None:
    if not _is_data_url(url):
        parse_remote_url(url, policy, subject="has a URL")


def parse_remote_url(url: str, policy: ImagePolicy, *, subject: str) -> httpx.URL:
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
        raise ImageRefused(f"{subject} on a remote host, but this server does not fetch remote images; "
                           "send the image inline as a data:image/...;base64 URL")
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


def _is_valid_host_pattern(pattern: str) -> bool:
    name = _normalize_host(pattern).removeprefix("*.")
    if _ip_literal(name) is not None:
        return not pattern.startswith("*.")
    return bool(name) and all(label and label.replace("-", "").isalnum() and label.isascii()
                              for label in name.split("."))


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
        address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified)


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
_FETCH_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException,
                 httpcore.UnsupportedProtocol)
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

    def __init__(self, *, resolver: Resolver | None = None,
                 network_backend: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._resolver = resolver or resolve_host
        self._network_backend = network_backend or httpcore.AnyIOBackend()
        self._ssl_context = httpx.create_ssl_context(trust_env=False)  # certifi's CAs, no SSL_CERT_* env

    async def fetch(self, url: str, policy: ImagePolicy) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch_following_redirects(url, policy), policy.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise ImageRefused(f"could not be fetched within {policy.fetch_timeout_s:g} s") from None

    async def _fetch_following_redirects(self, url: str, policy: ImagePolicy) -> bytes:
        target = parse_remote_url(url, policy, subject="has a URL")
        for _ in range(policy.max_redirects + 1):
            outcome = await self._fetch_once(target, policy)  # the body, or a redirect's Location
            if isinstance(outcome, bytes):
                return outcome
            target = parse_remote_url(_redirect_url(target, outcome), policy, subject="was redirected to a URL")
        raise ImageRefused(f"could not be fetched: it redirected more than {policy.max_redirects} times")

    async def _fetch_once(self, url: httpx.URL, policy: ImagePolicy) -> bytes | str:
        """One request: the body of a 2xx answer, or a redirect's Location as sent."""
        host = url.raw_host.decode("ascii")
        addresses = await self._public_addresses(host, url.port or _default_port(url), policy)
        backend = _PinnedBackend(host, addresses, self._network_backend)
        try:
            async with (httpcore.AsyncConnectionPool(ssl_context=self._ssl_context, network_backend=backend,
                                                     max_connections=1, retries=0) as pool,
                        pool.stream("GET", _core_url(url), headers=_request_headers(url)) as response):
                return await _read_answer(response, policy)
        except _FETCH_ERRORS:
            raise ImageRefused(f"could not be fetched: the connection to '{host}' failed") from None

    async def _public_addresses(self, host: str, port: int, policy: ImagePolicy) -> list[str]:
        """Every address `host` resolves to, each checked; the connection may only use these."""
        literal = _ip_literal(host)
        addresses = [literal] if literal is not None else await self._resolve(host, port)
        if not policy.allow_private_networks and not all(map(is_public_address, addresses)):
            raise ImageRefused(f"could not be fetched: the host '{host}' is on a loopback, private, link-local "
                               "or otherwise non-public network, which this server does not fetch from")
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


async def _read_answer(response: httpcore.Response, policy: ImagePolicy) -> bytes | str:
    if response.status in _REDIRECT_STATUSES:
        location = _header(response, b"location")
        if location is None:
            raise ImageRefused(f"could not be fetched: HTTP {response.status} without a Location header")
        return location.decode("latin-1")
    if not 200 <= response.status < 300:
        raise ImageRefused(f"could not be fetched: the server answered HTTP {response.status}")
    declared_bytes = _content_length(response)
    if declared_bytes is not None and declared_bytes > policy.max_bytes_per_image:
        raise ImageRefused(f"is {declared_bytes} bytes (its Content-Length); the limit is "
                           f"{policy.max_bytes_per_image} bytes")
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

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        if host != self._host:  # invariant: one pool per request, so this never happens
            raise httpcore.ConnectError(f"no pinned address for {host!r}")
        last_error: Exception = httpcore.ConnectError("no address")
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        raise last_error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image fetches never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
