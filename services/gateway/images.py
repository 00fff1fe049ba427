"""Image intake: the URLs of OpenAI `image_url` content parts -> checked images (bytes, size, hash), safely.

This module owns the entry point (`load_images`), the gateway's limits (`ImagePolicy`) and the
images clients name by uuid (`ImageSource`, `ImageReferences`). Two kinds of URL are accepted;
everything else (file:, ftp:, gopher:, a bare path, ...) is refused:

    data:image/<fmt>;base64,<payload>   inline; strict base64; size checked before decoding
                                        (services.gateway.data_urls)
    http(s)://host/...                  only hosts on `ImagePolicy.allowed_hosts` (empty by default:
                                        remote fetching is off until an operator lists hosts);
                                        fetched with SSRF defences: allow-list, public addresses
                                        only, connection pinned to the checked address, redirects
                                        checked hop by hop (services.gateway.image_fetch)

Every check that needs no I/O runs on all of a request's images before any fetch starts; remote
images are then fetched concurrently, and the first failure cancels the rest.

A part may carry a `uuid` (as in vLLM): the client's name for its image. The gateway keeps the bytes
of images sent with one (`ImageReferences`, LRU within a byte budget, scoped to the API key and
cache_salt), and a later part with the uuid and no image_url reuses them: the client uploads a large
image once. A uuid never changes an image's identity, which stays the hash of its bytes; the first
image of a request sent under a uuid is the one it names.

The checks are services.common.images.check_image: format, declared size against the limits (bombs),
and that Pillow can open it, all from the header; no pixel is decoded here. The encode workers decode
the pixels once, and data whose header passed but whose pixels are truncated or corrupt is refused
there, as a 400 naming the image all the same (services.workers.image_intake). The gateway remembers
the sizes of bytes it has checked (`ValidatedImages`).

Tunables (`ImagePolicy`, defaults in brackets): max_images_per_request [8], max_bytes_per_image
[20 MiB], max_pixels_per_image [4096*4096], max_side_px [8192], fetch_timeout_s [10 s],
max_redirects [3], allowed_hosts [()], allow_private_networks [False],
accepted_formats [PNG, JPEG, WEBP, GIF, BMP].

Failure policy: every refusal is an InvalidRequestError (HTTP 400) whose message names the image
(numbered from 1 in request order), what was wrong and the limit; it never carries a resolved address
or a traceback. The data URL and fetch modules raise ImageRefused; this module adds the image's name.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from services.common.errors import InvalidRequestError
from services.common.images import (
    ImageLimits,
    ImageRefused,
    LoadedImage,
    ValidatedImages,
    check_image,
    invalid_image,
)
from services.common.lru import BytesLRU
from services.gateway.data_urls import decode_data_url, is_data_url
from services.gateway.image_fetch import (
    RemoteFetcher,
    is_valid_host_pattern,
    parse_remote_url,
)


@dataclass(frozen=True)
class ImagePolicy(ImageLimits):
    """The image limits (ImageLimits) and what the gateway adds: images per request and remote fetches."""

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
            if not is_valid_host_pattern(pattern):
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
    encoded bytes, least recently used first out once their bytes pass `capacity_bytes`.

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
        with self._lock:
            self._images.put((scope, uuid), image)

    def __len__(self) -> int:
        return len(self._images)


class ImageFetcher(Protocol):
    async def fetch(self, url: str, policy: ImagePolicy) -> bytes:
        """The body behind an http(s) URL, checked against `policy`; raises ImageRefused."""
        ...


# ----------------------------------------------------------------------------------------------
# The entry points


async def load_images(
    sources: Sequence[str | ImageSource],
    policy: ImagePolicy,
    *,
    fetcher: ImageFetcher | None = None,
    param: str = "messages",
    validated: ValidatedImages | None = None,
    references: ImageReferences | None = None,
    scope: bytes = b"",
) -> list[LoadedImage]:
    """Checked images in the order of `sources` (URLs, or ImageSources that may name an image by uuid);
    raises InvalidRequestError(param=param) for the first bad one.

    Every check that needs no I/O runs on all sources before any fetch starts, including that each
    uuid without a URL names an image of this request or of `references` under `scope`. Remote images
    are fetched concurrently; hashing and the header checks run in worker threads, off the event loop.
    When one image fails, the others' fetches are cancelled. Once all are loaded, every uuid with a
    URL is recorded in `references`. Pass one long-lived `RemoteFetcher` as `fetcher` in a server: the
    default builds a new one (and its TLS context) per call.
    """
    if len(sources) > policy.max_images_per_request:
        raise InvalidRequestError(
            f"a request may carry at most {policy.max_images_per_request} images, not {len(sources)}", param=param
        )
    image_sources = [ImageSource(s) if isinstance(s, str) else s for s in sources]
    labels = [f"image {index + 1}" for index in range(len(image_sources))]
    sent = {s.uuid: i for i, s in reversed(list(enumerate(image_sources))) if s.url is not None and s.uuid is not None}
    earlier: dict[int, LoadedImage] = {}  # image index -> the image a uuid named in an earlier request
    for index, (label, source) in enumerate(zip(labels, image_sources)):
        if source.url is not None:
            try:
                _precheck_url(source.url, policy)
            except ImageRefused as exc:
                raise invalid_image(label, exc, param) from None
        elif source.uuid not in sent:
            assert source.uuid is not None  # ImageSource.__post_init__: a source without a url has a uuid
            found = references.get(scope, source.uuid) if references is not None else None
            if found is None:
                raise InvalidRequestError(
                    f"{label} names uuid {source.uuid!r} without an image_url, and no image was sent under that "
                    "uuid recently by this API key and cache_salt (or it has been evicted); send it again with "
                    "its image_url",
                    param=param,
                )
            earlier[index] = found
    urls = {index: s.url for index, s in enumerate(image_sources) if s.url is not None}
    if fetcher is None and not all(is_data_url(url) for url in urls.values()):
        fetcher = RemoteFetcher()
    loaded = dict(
        zip(
            urls,
            await _gather_or_cancel(
                _load_one(labels[index], url, policy, fetcher, param, validated) for index, url in urls.items()
            ),
        )
    )
    # cast: an image neither loaded nor found earlier has no url and its uuid is in `sent` (checked above)
    images = [
        loaded[i] if i in loaded else earlier[i] if i in earlier else loaded[sent[cast(str, s.uuid)]]
        for i, s in enumerate(image_sources)
    ]
    if references is not None:
        for uuid, index in sent.items():
            references.put(scope, uuid, images[index])
    return images


async def _load_one(
    label: str,
    url: str,
    policy: ImagePolicy,
    fetcher: ImageFetcher | None,
    param: str,
    validated: ValidatedImages | None = None,
) -> LoadedImage:
    try:
        if is_data_url(url):
            return await asyncio.to_thread(decode_data_url, url, policy, validated)
        assert fetcher is not None  # load_images builds one whenever a URL is remote
        data = await fetcher.fetch(url, policy)
        return await asyncio.to_thread(check_image, data, policy, validated)
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


def _precheck_url(url: str, policy: ImagePolicy) -> None:
    if not is_data_url(url):
        parse_remote_url(url, policy, subject="has a URL")
