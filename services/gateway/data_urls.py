"""Inline images: `data:` URLs -> their bytes -> an image checked from its header. No I/O.

Accepted form (RFC 2397, restricted): `data:image/<fmt>[;<param>...];base64,<payload>`. The media
type must be `image/*` and the `base64` parameter present; the payload is strict standard base64
(padded, no whitespace, no URL-safe alphabet), decoded by pybase64 with the standard library's rules.

The decoded size is computed from the payload's length and checked against the limit *before* the
payload is decoded, so an oversized upload costs no decoding. The bytes then go through
services.common.images.check_image (format allow-list and bomb checks, from the header alone).

Failure policy: every refusal raises ImageRefused with a reason that completes the sentence "image N
..." (a malformed URL, a non-image or non-base64 data URL, too many bytes, invalid base64, or what
the header check refused); the caller (services.gateway.images) names the image and turns it into an
InvalidRequestError (HTTP 400). Nothing here retries or repairs a payload.

Tunables: none of its own; it reads `ImageLimits` (max_bytes_per_image [20 MiB] and the header check's
limits), of which the gateway's ImagePolicy is one.
"""

from __future__ import annotations

import binascii

import pybase64

from services.common.images import (
    ImageLimits,
    ImageRefused,
    LoadedImage,
    ValidatedImages,
    check_image,
)


def is_data_url(url: str) -> bool:
    """Whether `url` has the data: scheme (any case); says nothing about whether it is well formed."""
    return url[:5].lower() == "data:"


def decode_data_url(url: str, limits: ImageLimits, validated: ValidatedImages | None = None) -> LoadedImage:
    """The image inside a data URL, checked against `limits` from its header; raises ImageRefused."""
    return check_image(data_url_bytes(url, limits), limits, validated)


def data_url_bytes(url: str, limits: ImageLimits) -> bytes:
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
    if num_bytes > limits.max_bytes_per_image:
        raise ImageRefused(f"is {num_bytes} bytes; the limit is {limits.max_bytes_per_image} bytes")
    try:
        return pybase64.b64decode(payload, validate=True)  # the standard library's rules, vectorised
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ImageRefused(
            "has a data URL whose payload is not valid base64 (standard alphabet, padded, no whitespace)"
        ) from None


def _base64_num_bytes(payload: str) -> int:
    """Bytes that a well-formed base64 payload decodes to: 3 per 4 characters, less the padding."""
    return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))
