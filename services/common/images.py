"""Images, safely: the gateway checks an image's header, an encode worker decodes its pixels once.

    gateway   check_image(bytes)   format (allow-list), declared size against the pixel and side limits,
                                   that Pillow can open it; content hash. Headers only: no pixel decoded.
    encoder   decode_image(bytes)  the same checks, then the pixels -> RGB, optionally at reduced scale

Both open lazily with Pillow, restricted to the accepted formats, and check the declared size *before*
any pixel is decoded (decompression bombs). Data whose header is fine but whose pixels are truncated or
corrupt passes the gateway and is refused by the encoder's decode; that refusal travels back to the
client as a 400 naming the image (services.workers.image_intake). Pillow's global settings are read,
never written. An animated GIF gives its first frame. Transparent pixels are composited onto white.

Draft decoding (`decode_image(..., draft_scale=...)`): a JPEG can be decoded at 1/2, 1/4 or 1/8 scale by
the JPEG decoder's own reduced-size IDCT (Pillow's `Image.draft`), which skips most of the decode's work
for an image the model's processor shrinks anyway. The caller says, from the declared size, which
reduction it can take (services.engine.multimodal.processor: the largest that still leaves the image at
least as large as the processor resizes it to). The pixels are NOT bit-equal to a full decode followed by
the same resize: a reduced IDCT averages each 2x2 .. 8x8 block in the frequency domain. Exactness tests
against transformers therefore feed it the same decoded image, or decode with drafting off. Other
formats have no draft and are always decoded in full.

An image's identity everywhere (embedding caches, KV block hashes, the ImageRef contract) is
`encoded_content_hash`: the hash of its encoded bytes.

Tunables (`ImageLimits`, defaults in brackets): max_bytes_per_image [20 MiB], max_pixels_per_image
[4096*4096], max_side_px [8192], accepted_formats [PNG, JPEG, WEBP, GIF, BMP]. The gateway's
`ImagePolicy` adds its request and fetch limits to these. DRAFT_SCALES = (8, 4, 2): the reductions a
JPEG decoder offers, largest first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidRequestError

MIB = 1024 * 1024
DRAFT_SCALES = (8, 4, 2)  # reductions a JPEG decoder's scaled IDCT offers (through Image.draft), largest first


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
    """An image as the gateway holds it: checked from its header, never decoded (the encoders decode)."""

    # Hex BLAKE2b (16-byte digest) of the raw encoded bytes, as received. Raw bytes rather than
    # pixels: hashing needs no decode, and the hash cannot change with the Pillow or libjpeg version,
    # so gateway replicas and the encode workers' embedding cache agree on it. The same picture
    # encoded differently gets another hash: a cache miss, never a wrong hit.
    content_hash: str
    width: int  # pixels, as the header declares
    height: int  # pixels, as the header declares
    num_bytes: int  # encoded bytes
    data: bytes = field(default=b"", repr=False, compare=False)  # the encoded bytes (what goes to an encoder)


@dataclass(frozen=True)
class DecodedImage:
    """An encoder's decode of one image."""

    image: Image.Image = field(repr=False, compare=False)  # mode "RGB", detached from the encoded bytes
    width: int  # pixels, as declared: the full-scale size (image.size is smaller when drafted)
    height: int
    # 1: decoded in full; 2, 4 or 8: a JPEG decoded at that reduction, image.size = ceil(width / scale) x ...
    draft_scale: int = 1


def encoded_content_hash(data: bytes) -> str:
    """An image's content hash (LoadedImage.content_hash, the ImageRef contract): BLAKE2b-128 hex of its
    encoded bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def draft_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """The size (width, height) a JPEG of this size decodes to at `scale` (Pillow rounds up)."""
    return -(-width // scale), -(-height // scale)


class ValidatedImages:
    """Content hash -> (width, height) of images that passed the header checks, most recent first.

    The same bytes again (a popular image, a multi-turn chat resending its images) skip even the header
    parse: the gateway needs only their size. Thread-safe (checks run in worker threads)."""

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

    The checks, the decoder and the gateway's fetchers raise it for anything the client's image got
    wrong; `invalid_image` turns it into the InvalidRequestError naming the image. Any other exception
    is a server fault.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def invalid_image(label: str, refusal: ImageRefused, param: str) -> InvalidRequestError:
    """The 400 for one refused image, named by its label."""
    return InvalidRequestError(f"{label} {refusal.reason}", param=param)


# What Pillow's plugins raise on malformed input (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError)
_WHITE = (255, 255, 255, 255)


# ----------------------------------------------------------------------------------------------
# The gateway: headers only


def check_image(data: bytes, limits: ImageLimits, validated: ValidatedImages | None = None) -> LoadedImage:
    """Encoded bytes -> LoadedImage, from the header alone (no pixel is decoded); raises ImageRefused.
    Bytes in `validated` skip the header parse. Blocking (hashing): call it from a worker thread."""
    _check_num_bytes(data, limits)
    content_hash = encoded_content_hash(data)
    size = validated.get(content_hash) if validated is not None else None
    if size is None:
        with _refusing_bad_data(limits), _open(data, limits) as image:
            size = image.size  # declared: Image.open parses the header and leaves the pixels alone
        if validated is not None:
            validated.add(content_hash, size)
    return LoadedImage(content_hash=content_hash, width=size[0], height=size[1], num_bytes=len(data), data=bytes(data))


# ----------------------------------------------------------------------------------------------
# The encoders: the pixels


def decode_image(
    data: bytes, limits: ImageLimits, draft_scale: Callable[[int, int], int] | None = None
) -> DecodedImage:
    """Encoded bytes -> RGB pixels (blocking); raises ImageRefused, truncated or corrupt data included.

    `draft_scale(width, height)`: the reduction (1, or one of DRAFT_SCALES) a JPEG of this declared size
    may be decoded at; None decodes every image in full. Formats without a draft ignore it.
    """
    _check_num_bytes(data, limits)
    with _refusing_bad_data(limits):
        image = _open(data, limits)
    with image:
        width, height = image.size
        # outside _refusing_bad_data: a failing draft_scale is a fault of ours, not of the client's data
        scale = _draft(image, draft_scale(width, height)) if draft_scale is not None else 1
        with _refusing_bad_data(limits):
            image.load()  # the first frame; raises on truncated data (LOAD_TRUNCATED_IMAGES is left off)
            return DecodedImage(_to_rgb(image), width, height, scale)


def decode_image_bytes(
    data: bytes,
    limits: ImageLimits,
    *,
    label: str = "the image",
    param: str = "messages",
    draft_scale: Callable[[int, int], int] | None = None,
) -> DecodedImage:
    """decode_image, whose refusal is an InvalidRequestError naming the image by `label`."""
    try:
        return decode_image(data, limits, draft_scale)
    except ImageRefused as exc:
        raise invalid_image(label, exc, param) from None


def _draft(image: Image.Image, scale: int) -> int:
    """Ask the JPEG decoder for a `scale`-times reduced decode; returns the reduction it will apply (1: none,
    as for every other format)."""
    width, height = image.size
    if scale < 2 or scale > min(width, height):
        return 1
    # Pillow's rule takes the largest of 8, 4, 2, 1 that is <= min(width // w, height // h); for
    # (w, h) = (width // scale, height // scale) that is exactly `scale` (width // (width // scale) lies in
    # [scale, 2 * scale)), and the image becomes draft_size(width, height, scale)
    if image.draft("RGB", (width // scale, height // scale)) is None:
        return 1
    return scale


# ----------------------------------------------------------------------------------------------
# Shared checks


def _check_num_bytes(data: bytes, limits: ImageLimits) -> None:
    if len(data) > limits.max_bytes_per_image:
        raise ImageRefused(f"is {len(data)} bytes; the limit is {limits.max_bytes_per_image} bytes")


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """The image opened lazily (its header parsed, no pixel decoded), its declared size checked."""
    # `formats` restricts which parsers ever see the bytes, not just which results are kept.
    image = Image.open(io.BytesIO(data), formats=limits.accepted_formats)
    try:
        _check_dimensions(image.width, image.height, limits)
    except ImageRefused:
        image.close()
        raise
    return image


@contextlib.contextmanager
def _refusing_bad_data(limits: ImageLimits) -> Iterator[None]:
    """Pillow's errors on what the client sent, as ImageRefused."""
    try:
        yield
    except Image.DecompressionBombError:
        raise ImageRefused(f"has too many pixels to decode safely; the limit is {_max_pixels(limits)} pixels") from None
    except UnidentifiedImageError:
        raise ImageRefused(f"is not a {_format_list(limits.accepted_formats)} image") from None
    except _DECODE_ERRORS:
        raise ImageRefused("is truncated or corrupt and could not be decoded") from None


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
