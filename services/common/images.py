"""Image decoding, shared by the gateway (which checks every image a request carries) and the encode
workers (which decode the pixels they encode): encoded bytes -> an RGB image, safely.

Decoding (`decode_image_bytes`, `check_and_decode`) opens lazily with Pillow, restricted to the
accepted formats, checks the declared size against the pixel and side limits *before* decoding any
pixel data (decompression bombs), then decodes; truncated or corrupt data is an error. Pillow's
global settings are read, never written. An animated GIF gives its first frame. Transparent pixels
are composited onto white.

An image's identity everywhere (embedding caches, KV block hashes, the ImageRef contract) is
`encoded_content_hash`: the hash of its encoded bytes.

Tunables (`ImageLimits`, defaults in brackets): max_bytes_per_image [20 MiB], max_pixels_per_image
[4096*4096], max_side_px [8192], accepted_formats [PNG, JPEG, WEBP, GIF, BMP]. The gateway's
`ImagePolicy` adds its request and fetch limits to these.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidRequestError

MIB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    max_bytes_per_image: int = 20 * MIB  # encoded bytes (decoded base64 or HTTP body)
    max_pixels_per_image: int = 4096 * 4096  # width * height, checked before any pixel is decoded
    max_side_px: int = 8192  # width and height each
    accepted_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow format names

    def __post_init__(self) -> None:
        for name in ("max_bytes_per_image", "max_pixels_per_image", "max_side_px"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        Image.init()  # registers Pillow's plugins (what Image.open does anyway) so names can be checked
        unknown = [name for name in self.accepted_formats if name not in Image.OPEN]
        if not self.accepted_formats or unknown:
            raise ValueError(f"accepted_formats must name formats Pillow can open; unknown: {unknown}")


@dataclass(frozen=True)
class LoadedImage:
    # Hex BLAKE2b (16-byte digest) of the raw encoded bytes, as received. Raw bytes rather than
    # pixels: hashing needs no decode, and the hash cannot change with the Pillow or libjpeg version,
    # so gateway replicas and the encode workers' embedding cache agree on it. The same picture
    # encoded differently gets another hash: a cache miss, never a wrong hit.
    content_hash: str
    # mode "RGB", detached from the encoded bytes; None when these exact bytes were decoded and checked
    # before (ValidatedImages): only their size is needed again, the encoders decode the pixels
    image: Image.Image | None = field(repr=False, compare=False)
    width: int  # pixels
    height: int  # pixels
    num_bytes: int  # encoded bytes
    data: bytes = field(default=b"", repr=False, compare=False)  # the encoded bytes (what goes to an encoder)


def encoded_content_hash(data: bytes) -> str:
    """An image's content hash (LoadedImage.content_hash, the ImageRef contract): BLAKE2b-128 hex of its
    encoded bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ValidatedImages:
    """Content hash -> (width, height) of images that decoded and passed the checks, most recent first.

    The same bytes again (a popular image, a multi-turn chat resending its images) skip the decode: the
    gateway needs only their size. Thread-safe (decoding runs in worker threads)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._sizes: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, content_hash: str) -> tuple[int, int] | None:
        with self._lock:
            size = self._sizes.get(content_hash)
            if size is not None:
                self._sizes.move_to_end(content_hash)
            return size

    def add(self, content_hash: str, size: tuple[int, int]) -> None:
        with self._lock:
            self._sizes[content_hash] = size
            self._sizes.move_to_end(content_hash)
            while len(self._sizes) > self.capacity:
                self._sizes.popitem(last=False)


class ImageRefused(Exception):
    """Why one image cannot be used, worded to follow its label ("image 2" + " is 8000x8000 pixels...").

    Decoding and the gateway's fetchers raise it for anything the client's image got wrong;
    `invalid_image` turns it into the InvalidRequestError naming the image. Any other exception is a
    server fault.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image_bytes(
    data: bytes, limits: ImageLimits, *, label: str = "the image", param: str = "messages"
) -> LoadedImage:
    """Encoded bytes -> LoadedImage (blocking: call it from a worker thread); raises InvalidRequestError."""
    try:
        return check_and_decode(data, limits)
    except ImageRefused as exc:
        raise invalid_image(label, exc, param) from None


def invalid_image(label: str, refusal: ImageRefused, param: str) -> InvalidRequestError:
    """The 400 for one refused image, named by its label."""
    return InvalidRequestError(f"{label} {refusal.reason}", param=param)


# What Pillow's plugins raise on malformed input (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError)
_WHITE = (255, 255, 255, 255)


def check_and_decode(data: bytes, limits: ImageLimits, validated: ValidatedImages | None = None) -> LoadedImage:
    """Encoded bytes -> LoadedImage (blocking); raises ImageRefused. Bytes in `validated` skip the decode."""
    if len(data) > limits.max_bytes_per_image:
        raise ImageRefused(f"is {len(data)} bytes; the limit is {limits.max_bytes_per_image} bytes")
    content_hash = encoded_content_hash(data)
    known = validated.get(content_hash) if validated is not None else None
    if known is not None:  # these exact bytes decoded and passed before (same limits: the same server)
        return LoadedImage(
            content_hash=content_hash,
            image=None,
            width=known[0],
            height=known[1],
            num_bytes=len(data),
            data=bytes(data),
        )
    try:
        # `formats` restricts which parsers ever see the bytes, not just which results are kept.
        with Image.open(io.BytesIO(data), formats=limits.accepted_formats) as image:
            _check_dimensions(image.width, image.height, limits)  # before load(): nothing decoded yet
            image.load()  # the first frame; raises on truncated data (LOAD_TRUNCATED_IMAGES is left off)
            rgb = _to_rgb(image)
    except Image.DecompressionBombError:
        raise ImageRefused(f"has too many pixels to decode safely; the limit is {_max_pixels(limits)} pixels") from None
    except UnidentifiedImageError:
        raise ImageRefused(f"is not a {_format_list(limits.accepted_formats)} image") from None
    except _DECODE_ERRORS:
        raise ImageRefused("is truncated or corrupt and could not be decoded") from None
    if validated is not None:
        validated.add(content_hash, (rgb.width, rgb.height))
    return LoadedImage(
        content_hash=content_hash, image=rgb, width=rgb.width, height=rgb.height, num_bytes=len(data), data=bytes(data)
    )


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    max_pixels = _max_pixels(limits)
    if width * height > max_pixels:
        raise ImageRefused(f"is {width}x{height} pixels; the limit is {max_pixels} pixels")
    if max(width, height) > limits.max_side_px:
        raise ImageRefused(f"is {width}x{height} pixels; the limit is {limits.max_side_px} pixels per side")


def _max_pixels(limits: ImageLimits) -> int:
    """max_pixels_per_image, or Pillow's own when an operator set that lower (read, never written).

    Pillow warns between its limit and twice it, and raises above; refusing everything above its limit
    treats the warning as a refusal without touching the process-wide warnings filters.
    """
    pillow_max_pixels = Image.MAX_IMAGE_PIXELS
    if pillow_max_pixels is None:
        return limits.max_pixels_per_image
    return min(limits.max_pixels_per_image, int(pillow_max_pixels))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited onto white (as a page shows them).

    Dropping alpha instead would show whatever colour the encoder left under transparent pixels,
    often black or noise.
    """
    if image.mode == "RGB" and not _has_alpha(image):  # an RGB PNG may still name a transparent colour
        return image  # loaded, so detached from its file; a copy would cost ~13 ms per 4 MP
    if not _has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _format_list(formats: Sequence[str]) -> str:
    return formats[0] if len(formats) == 1 else ", ".join(formats[:-1]) + " or " + formats[-1]
