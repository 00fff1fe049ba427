"""Image intake: the gateway's header-only checks, the encoders' decode (draft decoding included), the
bad-image matrix, and SSRF defences of remote fetches.

No test touches the network. Remote fetches go to a threaded HTTP server on 127.0.0.1, either
directly or through `FakeInternet`, a network backend that records every TCP connection the fetcher
asks for (address and port) and carries it to the local server whatever the address: the SSRF tests
assert on what was asked, with names resolved by `FakeDns`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote

import httpcore
import pytest
from PIL import Image, ImageFile

from services.common.errors import InvalidRequestError
from services.common.images import (
    ImageLimits,
    ImageRefused,
    LoadedImage,
    ValidatedImages,
    check_image,
    decode_image,
    decode_image_bytes,
    encoded_content_hash,
)
from services.gateway.image_fetch import (
    RemoteFetcher,
    host_is_allowed,
    is_public_address,
)
from services.gateway.images import (
    ImagePolicy,
    ImageReferences,
    ImageSource,
    load_images,
    reference_scope,
)

PUBLIC_IP = "93.184.216.34"  # a globally routable address; FakeInternet never really goes there
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


# ----------------------------------------------------------------------------------------------
# Helpers


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


TINY_PNG = encode(Image.new("RGB", (4, 3), (200, 10, 10)), "PNG")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, *, complete: bool) -> bytes:
    """A 1-bit grayscale PNG of width x height pixels, written by hand.

    complete: every row is there (zero rows compress ~1000:1, so 8000x8000 is ~8 KB: a decompression
    bomb). Not complete: the header and one row, so decoding the pixels fails as truncated.
    """
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    if complete:
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:  # a zlib stream left open: a decoder wants more and finds the end of the file
        idat = compressor.compress(row) + compressor.flush(zlib.Z_SYNC_FLUSH)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
    return png + _png_chunk(b"IEND", b"") if complete else png


def refusal(data_or_url: bytes | str, policy: ImagePolicy | None = None) -> str:
    """The InvalidRequestError message for one image (bytes are sent as a PNG data URL)."""
    url = data_url(data_or_url) if isinstance(data_or_url, bytes) else data_or_url
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(load_images([url], policy or ImagePolicy()))
    assert info.value.param == "messages"
    return info.value.message


def load(urls: list[str], policy: ImagePolicy | None = None, fetcher=None) -> list[LoadedImage]:
    return asyncio.run(load_images(urls, policy or ImagePolicy(), fetcher=fetcher))


@pytest.fixture(autouse=True)
def pillow_globals_untouched():
    """No code path may change Pillow's process-wide settings."""
    max_image_pixels = Image.MAX_IMAGE_PIXELS
    yield
    assert max_image_pixels == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------------------------
# Decoding valid images


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_accepted_format_is_checked_by_the_gateway_and_decodes_to_rgb_of_its_size(fmt):
    encoded = encode(Image.new("RGB", (5, 3), (10, 20, 30)), fmt)
    [loaded] = load([data_url(encoded, f"image/{fmt.lower()}")])
    assert (loaded.width, loaded.height, loaded.num_bytes, loaded.data) == (5, 3, len(encoded), encoded)
    assert loaded.content_hash == hashlib.blake2b(encoded, digest_size=16).hexdigest()
    decoded = decode_image_bytes(encoded, ImageLimits())  # an encoder's decode
    assert (decoded.width, decoded.height, decoded.image.size, decoded.image.mode) == (5, 3, (5, 3), "RGB")


def test_content_hash_is_stable_for_the_same_bytes_and_differs_for_other_bytes():
    other = encode(Image.new("RGB", (4, 3), (200, 10, 11)), "PNG")
    first, again, different = load([data_url(TINY_PNG), data_url(TINY_PNG), data_url(other)])
    assert first.content_hash == again.content_hash
    assert first.content_hash != different.content_hash
    assert len(first.content_hash) == 32  # 16 bytes, hex


def test_the_encoders_decode_agrees_with_the_gateways_check():
    decoded = decode_image_bytes(TINY_PNG, ImageLimits())
    [loaded] = load([data_url(TINY_PNG)])
    assert (decoded.width, decoded.height, decoded.draft_scale) == (loaded.width, loaded.height, 1)
    assert decoded.image.getpixel((0, 0)) == (200, 10, 10)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert decode_image_bytes(gif, ImageLimits()).image.getpixel((3, 3)) == (255, 0, 0)


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 128, 0, 255))
    decoded = decode_image_bytes(encode(rgba, "PNG"), ImageLimits())
    assert [decoded.image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 128, 0)]


def test_an_rgb_image_with_a_transparent_colour_key_is_composited_too():
    rgb = Image.new("RGB", (2, 1), (0, 0, 0))
    rgb.putpixel((1, 0), (0, 128, 0))
    decoded = decode_image_bytes(encode(rgb, "PNG", transparency=(0, 0, 0)), ImageLimits())
    assert [decoded.image.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 128, 0)]


def test_bytes_decide_the_format_not_the_declared_mime_type():
    [loaded] = load([data_url(TINY_PNG, "image/jpeg")])  # mislabelled, as clients often do
    assert (loaded.width, loaded.height) == (4, 3)


def test_the_hand_written_png_is_valid_when_complete_and_truncated_when_not():
    loaded = decode_image_bytes(png_declaring(16, 9, complete=True), ImageLimits())
    assert (loaded.width, loaded.height) == (16, 9)
    with pytest.raises(InvalidRequestError, match=r"^the image is truncated or corrupt"):
        decode_image_bytes(png_declaring(16, 9, complete=False), ImageLimits())


# ----------------------------------------------------------------------------------------------
# The bad-image matrix

_JPEG = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
_PNG = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")
_B64_PNG = base64.b64encode(TINY_PNG).decode()
assert _B64_PNG.endswith("=")  # so that stripping it makes the padding wrong


@pytest.mark.parametrize(
    "url, expected",
    [
        (data_url(b"this is not an image, just some text " * 4), "image 1 is not a PNG, JPEG, WEBP, GIF or BMP image"),
        (data_url(b""), "image 1 is not a PNG, JPEG, WEBP, GIF or BMP image"),
        (
            data_url(encode(Image.new("RGB", (4, 4)), "TIFF"), "image/tiff"),
            "is not a PNG, JPEG, WEBP, GIF or BMP image",
        ),
        (data_url(encode(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon"), "is not a PNG, JPEG, WEBP, GIF or BMP"),
        (data_url(b"hello", "text/plain"), "image 1 has a data URL of MIME type 'text/plain'"),
        ("data:,hello", "MIME type 'text/plain (the default when none is given)'"),
        ("data:image/png;base64,@@@@", "payload is not valid base64"),
        (f"data:image/png;base64,{_B64_PNG[:40]}\n{_B64_PNG[40:]}", "payload is not valid base64"),
        (f"data:image/png;base64,{_B64_PNG.rstrip('=')}", "payload is not valid base64"),  # padding missing
        ("data:image/png;base64,iVBORw0KGgo=\u00e9", "payload is not valid base64"),
        ("data:image/png;base64", "malformed data URL: there is no ','"),
        ("data:image/png,%89PNG%0D%0A", "not base64-encoded"),
    ],
)
def test_bad_images_are_refused_with_a_useful_message(url, expected):
    assert expected in refusal(url)


def test_too_many_images_is_refused_before_any_fetch():
    fetcher = SpyFetcher()
    policy = ImagePolicy(allowed_hosts=("cdn.test",))
    with pytest.raises(InvalidRequestError) as info:
        load([f"http://cdn.test/{index}.png" for index in range(9)], policy, fetcher)
    assert info.value.message == "a request may carry at most 8 images, not 9"
    assert fetcher.urls == []


def test_too_many_bytes_is_refused_before_base64_decoding():
    policy = ImagePolicy(max_bytes_per_image=1000)
    big = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "BMP")  # 12 KB
    assert refusal(big, policy) == f"image 1 is {len(big)} bytes; the limit is 1000 bytes"
    # The payload is not even valid base64: the size is refused first, from the payload's length.
    assert refusal("data:image/png;base64," + "@" * 4000, policy) == "image 1 is 3000 bytes; the limit is 1000 bytes"
    with pytest.raises(InvalidRequestError, match=r"the image is 12.* bytes; the limit is 1000 bytes"):
        decode_image_bytes(big, policy)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_declaring(8000, 8000, complete=True)
    assert len(bomb) < 64 * 1024  # 64 M pixels in a few KB
    started_s = time.monotonic()
    assert refusal(bomb) == "image 1 is 8000x8000 pixels; the limit is 16777216 pixels"
    assert time.monotonic() - started_s < 1.0
    # Only the header and one row: had the pixels been decoded first, this would say "truncated".
    # So the refusal comes from the declared size alone, with no 64 M pixel buffer allocated.
    header_only = png_declaring(8000, 8000, complete=False)
    assert refusal(header_only) == "image 1 is 8000x8000 pixels; the limit is 16777216 pixels"


def test_too_wide_is_refused():
    assert (
        refusal(png_declaring(9000, 2, complete=False)) == "image 1 is 9000x2 pixels; the limit is 8192 pixels per side"
    )


def test_pillow_decompression_bomb_error_is_a_refusal():
    policy = ImagePolicy(max_pixels_per_image=10**10, max_side_px=10**6)  # beyond Pillow's own limit
    message = refusal(png_declaring(20000, 20000, complete=False), policy)  # 2x Pillow's: it raises
    assert message == f"image 1 has too many pixels to decode safely; the limit is {Image.MAX_IMAGE_PIXELS} pixels"


def test_pillow_decompression_bomb_warning_is_a_refusal():
    policy = ImagePolicy(max_pixels_per_image=10**10, max_side_px=10**6)
    with pytest.warns(Image.DecompressionBombWarning):  # between Pillow's limit and twice it
        message = refusal(png_declaring(10000, 10000, complete=False), policy)
    assert message == f"image 1 is 10000x10000 pixels; the limit is {Image.MAX_IMAGE_PIXELS} pixels"


def test_accepted_formats_can_be_narrowed():
    policy = ImagePolicy(accepted_formats=("PNG",))
    assert (
        refusal(data_url(encode(Image.new("RGB", (2, 2)), "BMP"), "image/bmp"), policy) == "image 1 is not a PNG image"
    )


# ----------------------------------------------------------------------------------------------
# The gateway reads headers only; the encoders decode (and refuse what the header hid)


@pytest.fixture
def no_pixel_decoded(monkeypatch):
    """Any decode of pixel data (ImageFile.load, what Image.load and every conversion go through) fails."""

    def load(self):
        raise AssertionError(f"the pixels of a {self.format} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_the_gateway_checks_images_without_decoding_their_pixels(no_pixel_decoded):
    noise = Image.effect_noise((40, 30), 60).convert("RGB")
    for fmt in FORMATS:
        [loaded] = load([data_url(encode(noise, fmt), f"image/{fmt.lower()}")])
        assert (loaded.width, loaded.height) == (40, 30)
    bomb = png_declaring(8000, 8000, complete=True)
    assert refusal(bomb) == "image 1 is 8000x8000 pixels; the limit is 16777216 pixels"
    assert refusal(png_declaring(9000, 2, complete=True)).endswith("the limit is 8192 pixels per side")
    assert "not a PNG, JPEG" in refusal(data_url(encode(noise, "TIFF"), "image/tiff"))
    assert "not a PNG, JPEG" in refusal(b"GIF89a but nothing else")
    big = encode(noise, "BMP")
    assert refusal(big, ImagePolicy(max_bytes_per_image=1000)).startswith(f"image 1 is {len(big)} bytes")


def test_truncated_pixels_pass_the_header_check_and_are_refused_by_the_decode():
    for fmt, data in (("JPEG", _JPEG[: len(_JPEG) // 2]), ("PNG", _PNG[: len(_PNG) // 2])):
        checked = check_image(data, ImageLimits())
        assert (checked.width, checked.height, checked.content_hash) == (64, 64, encoded_content_hash(data)), fmt
        with pytest.raises(ImageRefused, match=r"^is truncated or corrupt and could not be decoded$"):
            decode_image(data, ImageLimits())
        with pytest.raises(InvalidRequestError, match=r"^it is truncated or corrupt"):
            decode_image_bytes(data, ImageLimits(), label="it")


def test_a_jpeg_is_decoded_at_the_reduction_asked_for_and_other_formats_in_full():
    photo = Image.new("RGB", (4000, 3000), (90, 120, 200))  # one colour: encodes in ~50 ms
    jpeg, png = encode(photo, "JPEG"), encode(photo.resize((400, 300)), "PNG")
    # Pillow's rule: the image becomes ceil(width / scale) x ceil(height / scale)
    for scale, size in ((8, (500, 375)), (4, (1000, 750)), (2, (2000, 1500)), (1, (4000, 3000))):
        decoded = decode_image(jpeg, ImageLimits(), draft_scale=lambda w, h, s=scale: s)
        assert (decoded.image.size, decoded.draft_scale, decoded.width, decoded.height) == (size, scale, 4000, 3000)
        pixel = decoded.image.getpixel((7, 7))
        assert decoded.image.mode == "RGB" and max(abs(x - y) for x, y in zip(pixel, (90, 120, 200))) <= 2
    odd = decode_image(encode(photo.crop((0, 0, 4001, 2999)), "JPEG"), ImageLimits(), draft_scale=lambda w, h: 8)
    assert odd.image.size == (501, 375)  # rounded up
    asked = []
    decoded = decode_image(png, ImageLimits(), draft_scale=lambda w, h: asked.append((w, h)) or 8)
    assert asked == [(400, 300)] and (decoded.image.size, decoded.draft_scale) == ((400, 300), 1)
    assert decode_image(jpeg, ImageLimits()).image.size == (4000, 3000)  # no draft_scale: in full


@pytest.mark.parametrize(
    "url, expected",
    [
        ("file:///etc/passwd", "with scheme 'file'"),
        ("ftp://cdn.test/a.png", "with scheme 'ftp'"),
        ("gopher://cdn.test/_x", "with scheme 'gopher'"),
        ("javascript:alert(1)", "with scheme 'javascript'"),
        ("/etc/passwd", "without a scheme"),
        ("", "without a scheme"),
        ("http://user:secret@cdn.test/a.png", "credentials"),
        ("http://cdn.test:0/a.png", "invalid port"),
    ],
)
def test_other_schemes_and_odd_urls_are_refused(url, expected):
    fetcher = SpyFetcher()
    with pytest.raises(InvalidRequestError, match=f"^image 1 has a URL .*{expected}"):
        load([url], ImagePolicy(allowed_hosts=("cdn.test",)), fetcher)
    assert fetcher.urls == []


def test_remote_urls_are_refused_when_no_host_is_allowed():
    fetcher = SpyFetcher()
    with pytest.raises(InvalidRequestError) as info:
        load(["https://cdn.test/a.png"], ImagePolicy(), fetcher)
    assert "this server does not fetch remote images" in info.value.message
    assert "data:image/...;base64" in info.value.message
    assert fetcher.urls == []


def test_one_bad_url_stops_the_request_before_any_fetch():
    fetcher = SpyFetcher()
    with pytest.raises(InvalidRequestError, match=r"^image 2 has a URL with scheme 'file'"):
        load(["http://cdn.test/a.png", "file:///etc/passwd"], ImagePolicy(allowed_hosts=("cdn.test",)), fetcher)
    assert fetcher.urls == []


# ----------------------------------------------------------------------------------------------
# load_images: concurrency and cancellation


@dataclass
class SpyFetcher:
    """An ImageFetcher that serves TINY_PNG after `delay_s`, or refuses URLs containing 'refuse'."""

    delay_s: float = 0.0
    urls: list[str] = field(default_factory=list)
    num_in_flight: int = 0
    max_in_flight: int = 0
    cancelled: list[str] = field(default_factory=list)

    async def fetch(self, url: str, policy: ImagePolicy) -> bytes:
        self.urls.append(url)
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            if "refuse" in url:
                raise ImageRefused("could not be fetched: the server answered HTTP 404")
            await asyncio.sleep(self.delay_s)
            return TINY_PNG
        except asyncio.CancelledError:
            self.cancelled.append(url)
            raise
        finally:
            self.num_in_flight -= 1


def test_remote_images_are_fetched_concurrently_and_keep_their_order():
    fetcher = SpyFetcher(delay_s=0.05)
    urls = [f"http://cdn.test/{index}.png" for index in range(3)]
    loaded = load([urls[0], data_url(TINY_PNG), *urls[1:]], ImagePolicy(allowed_hosts=("cdn.test",)), fetcher)
    assert [image.width for image in loaded] == [4, 4, 4, 4]
    assert fetcher.urls == urls
    assert fetcher.max_in_flight == 3


def test_a_failed_image_cancels_the_other_fetches():
    fetcher = SpyFetcher(delay_s=60)
    policy = ImagePolicy(allowed_hosts=("cdn.test",))

    async def go():
        with pytest.raises(InvalidRequestError) as info:
            await load_images(["http://cdn.test/slow.png", "http://cdn.test/refuse.png"], policy, fetcher=fetcher)
        assert info.value.message == "image 2 could not be fetched: the server answered HTTP 404"
        await asyncio.sleep(0)  # let the cancellation land
        # Checked here: once go() returns, asyncio.run would cancel leftover tasks by itself.
        assert fetcher.cancelled == ["http://cdn.test/slow.png"]

    asyncio.run(go())


# ----------------------------------------------------------------------------------------------
# A local HTTP server and a fake network for remote fetches


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _ImageServer

    def do_GET(self) -> None:
        self.server.host_headers.append(self.headers.get("Host"))
        path, _, query = self.path.partition("?")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the fetcher hung up, as it should
            self._route(path, parse_qs(query))  # on an over-size or slow answer

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        if path.startswith("/hop/") and int(path.removeprefix("/hop/")) > 0:
            self._redirect(f"/hop/{int(path.removeprefix('/hop/')) - 1}")  # a relative Location
        elif path in ("/tiny.png", "/hop/0"):
            self._answer(200, TINY_PNG)
        elif path == "/redirect":
            self._redirect(query["to"][0])
        elif path == "/no-location":
            self._answer(302, b"")
        elif path == "/huge-declared":
            self._answer(200, b"\x89PNG", content_length=10**9)
        elif path == "/endless":
            self._endless()
        elif path == "/slow":
            self._slow()
        else:
            self._answer(404, b"not found")

    def _answer(self, status: int, body: bytes, content_length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _endless(self) -> None:
        """No Content-Length (the body ends when the connection does) and no end: only a cap stops it."""
        self.send_response(200)
        self.end_headers()
        chunk = b"\0" * 65536
        while True:
            self.wfile.write(chunk)

    def _slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(0.05)

    def log_message(self, format, *args) -> None:
        pass


class _ImageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.host_headers: list[str | None] = []

    def handle_error(self, request, client_address) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[_ImageServer]:
    image_server = _ImageServer()
    thread = threading.Thread(target=image_server.serve_forever, daemon=True)
    thread.start()
    yield image_server
    image_server.shutdown()
    image_server.server_close()


class FakeInternet(httpcore.AsyncNetworkBackend):
    """Records each TCP connection asked for, then carries it to the local server, whatever the address."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.connections: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connections.append((host, port))
        return await httpcore.AnyIOBackend().connect_tcp("127.0.0.1", self.server_port, timeout=timeout)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise AssertionError("never used")

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)


DNS_RECORDS = {
    "cdn.test": [PUBLIC_IP],
    "images.test": ["127.0.0.1"],
    "localhost": ["127.0.0.1"],
    "ten.test": ["10.1.2.3"],
    "home.test": ["192.168.0.10"],
    "corp.test": ["172.16.5.4"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "v6-loopback.test": ["::1"],
    "half-private.test": [PUBLIC_IP, "10.0.0.1"],
    "internal.test": ["10.0.0.5"],
}


class FakeDns:
    """Answers from DNS_RECORDS and records every lookup."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in DNS_RECORDS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return DNS_RECORDS[host]


@dataclass
class Net:
    dns: FakeDns
    internet: FakeInternet
    fetcher: RemoteFetcher

    def fetch(self, url: str, policy: ImagePolicy) -> list[LoadedImage]:
        return load([url], policy, self.fetcher)

    def refusal(self, url: str, policy: ImagePolicy) -> str:
        with pytest.raises(InvalidRequestError) as info:
            self.fetch(url, policy)
        return info.value.message


@pytest.fixture
def net(server) -> Net:
    dns, internet = FakeDns(), FakeInternet(server.server_address[1])
    return Net(dns, internet, RemoteFetcher(resolver=dns, network_backend=internet))


ALLOWED = (
    "cdn.test",
    "images.test",
    "localhost",
    "*.test",
    "127.0.0.1",
    "::1",
    "10.0.0.1",
    "192.168.1.1",
    "172.16.0.1",
    "172.31.255.255",
    "169.254.169.254",
    "::ffff:127.0.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "100.64.0.1",
    "fe80::1",
)


# ----------------------------------------------------------------------------------------------
# Remote fetches that succeed


def test_fetch_from_a_real_local_server(server):
    port = server.server_address[1]
    policy = ImagePolicy(allowed_hosts=("127.0.0.1", "localhost"), allow_private_networks=True)
    loaded = load([f"http://127.0.0.1:{port}/tiny.png", f"http://localhost:{port}/hop/2"], policy)  # real DNS
    assert [(image.width, image.height) for image in loaded] == [(4, 3), (4, 3)]
    assert loaded[0].content_hash == hashlib.blake2b(TINY_PNG, digest_size=16).hexdigest()


def test_connection_goes_to_the_checked_address_with_the_original_host_header(net, server):
    port = server.server_address[1]
    server.host_headers.clear()
    policy = ImagePolicy(allowed_hosts=("images.test",), allow_private_networks=True)
    [loaded] = net.fetch(f"http://images.test:{port}/tiny.png", policy)
    assert loaded.width == 4
    assert net.dns.lookups == ["images.test"]  # resolved once: nothing can rebind it afterwards
    assert net.internet.connections == [("127.0.0.1", port)]
    assert server.host_headers == [f"images.test:{port}"]


def test_public_host_is_fetched_and_redirects_are_followed_up_to_the_limit(net):
    [loaded] = net.fetch("http://cdn.test/hop/3", ImagePolicy(allowed_hosts=("cdn.test",)))
    assert loaded.width == 4
    assert net.internet.connections == [(PUBLIC_IP, 80)] * 4  # three redirects, each hop reconnects
    assert net.dns.lookups == ["cdn.test"] * 4


def test_wildcard_allows_subdomains_case_insensitively(net):
    assert net.fetch("http://CDN.Test/tiny.png", ImagePolicy(allowed_hosts=("*.TEST",)))[0].width == 4


# ----------------------------------------------------------------------------------------------
# SSRF: every one of these is refused before any connection is made

_NON_PUBLIC = "is on a loopback, private, link-local or otherwise non-public network"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://localhost/a.png",  # resolves to 127.0.0.1
        "http://10.0.0.1/a.png",
        "http://192.168.1.1/a.png",
        "http://172.16.0.1/a.png",
        "http://172.31.255.255/a.png",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
        "http://[::ffff:127.0.0.1]/a.png",  # IPv4-mapped IPv6
        "http://0.0.0.0/a.png",
        "http://224.0.0.1/a.png",
        "http://100.64.0.1/a.png",  # carrier-grade NAT: not global
        "http://[fe80::1]/a.png",
        "http://ten.test/a.png",
        "http://home.test/a.png",
        "http://corp.test/a.png",
        "http://metadata.test/a.png",
        "http://mapped.test/a.png",
        "http://v6-loopback.test/a.png",
        "http://half-private.test/a.png",  # one private address among public ones is enough
        "https://internal.test/a.png",
    ],
)
def test_non_public_addresses_are_refused_without_connecting(net, url):
    message = net.refusal(url, ImagePolicy(allowed_hosts=ALLOWED))
    assert message.startswith("image 1 could not be fetched: the host ")
    assert _NON_PUBLIC in message
    assert net.internet.connections == []


def test_ip_literals_are_checked_without_dns(net):
    net.refusal("http://169.254.169.254/", ImagePolicy(allowed_hosts=ALLOWED))
    assert net.dns.lookups == []


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("http://evil.test/a.png", ("cdn.test",)),
        ("http://evilcdn.test/a.png", ("*.cdn.test",)),
        ("http://cdn.test.evil.test/a.png", ("cdn.test",)),
        ("http://cdn.test/a.png", ("*.cdn.test",)),  # a wildcard covers subdomains, not the domain
        ("http://127.0.0.1/a.png", ("localhost",)),
    ],
)
def test_hosts_off_the_list_are_refused_without_dns_or_connection(net, url, allowed):
    message = net.refusal(url, ImagePolicy(allowed_hosts=allowed))
    assert "is not on this server's list of allowed image hosts" in message
    assert net.dns.lookups == []
    assert net.internet.connections == []


def test_unresolvable_host_is_refused(net):
    assert (
        net.refusal("http://nowhere.test/a.png", ImagePolicy(allowed_hosts=("*.test",)))
        == "image 1 could not be fetched: the host 'nowhere.test' could not be resolved"
    )


@pytest.mark.parametrize(
    "location, expected",
    [
        ("http://evil.test/a.png", "was redirected to a URL whose host 'evil.test' is not on this server's list"),
        ("http://internal.test/a.png", _NON_PUBLIC),
        ("http://169.254.169.254/latest/meta-data/", _NON_PUBLIC),
        ("http://[::ffff:127.0.0.1]/", _NON_PUBLIC),
        ("file:///etc/passwd", "was redirected to a URL with scheme 'file'"),
        ("data:image/png;base64,AAAA", "was redirected to a URL with scheme 'data'"),
    ],
)
def test_redirects_are_checked_like_the_first_hop(net, location, expected):
    allowed = ("cdn.test", "internal.test", "169.254.169.254", "::ffff:127.0.0.1")
    message = net.refusal(f"http://cdn.test/redirect?to={quote(location, safe='')}", ImagePolicy(allowed_hosts=allowed))
    assert expected in message
    assert net.internet.connections == [(PUBLIC_IP, 80)]  # the first hop only


def test_too_many_redirects_are_refused(net):
    message = net.refusal("http://cdn.test/hop/4", ImagePolicy(allowed_hosts=("cdn.test",)))
    assert message == "image 1 could not be fetched: it redirected more than 3 times"
    assert len(net.internet.connections) == 4


def test_redirects_can_be_switched_off(net):
    message = net.refusal("http://cdn.test/hop/1", ImagePolicy(allowed_hosts=("cdn.test",), max_redirects=0))
    assert message == "image 1 could not be fetched: it redirected more than 0 times"


# ----------------------------------------------------------------------------------------------
# Remote answers that are refused


def test_non_2xx_is_refused(net):
    assert (
        net.refusal("http://cdn.test/missing.png", ImagePolicy(allowed_hosts=("cdn.test",)))
        == "image 1 could not be fetched: the server answered HTTP 404"
    )
    assert "without a Location header" in net.refusal(
        "http://cdn.test/no-location", ImagePolicy(allowed_hosts=("cdn.test",))
    )


def test_over_size_content_length_is_refused_before_reading(net):
    message = net.refusal("http://cdn.test/huge-declared", ImagePolicy(allowed_hosts=("cdn.test",)))
    assert message == f"image 1 is 1000000000 bytes (its Content-Length); the limit is {20 * 1024 * 1024} bytes"


def test_over_size_body_is_cut_off(net):
    policy = ImagePolicy(allowed_hosts=("cdn.test",), max_bytes_per_image=100_000, fetch_timeout_s=5.0)
    started_s = time.monotonic()
    message = net.refusal("http://cdn.test/endless", policy)  # would run until the deadline uncapped
    assert message == "image 1 is more than 100000 bytes (the limit); the download was stopped"
    assert time.monotonic() - started_s < 2.0


def test_slow_server_hits_the_deadline(net):
    policy = ImagePolicy(allowed_hosts=("cdn.test",), fetch_timeout_s=0.2)
    started_s = time.monotonic()
    assert net.refusal("http://cdn.test/slow", policy) == "image 1 could not be fetched within 0.2 s"
    assert time.monotonic() - started_s < 1.5


def test_connection_failure_is_refused(server):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = ImagePolicy(allowed_hosts=("127.0.0.1",), allow_private_networks=True)
    with pytest.raises(InvalidRequestError, match=r"^image 1 could not be fetched: the connection to '127.0.0.1'"):
        load([f"http://127.0.0.1:{port}/a.png"], policy)


# ----------------------------------------------------------------------------------------------
# Policy and address rules


@pytest.mark.parametrize(
    "host, allowed, expected",
    [
        ("cdn.test", ("cdn.test",), True),
        ("CDN.test", ("cdn.TEST",), True),
        ("cdn.test.", ("cdn.test",), True),
        ("a.cdn.test", ("*.cdn.test",), True),
        ("a.b.cdn.test", ("*.cdn.test",), True),
        ("cdn.test", ("*.cdn.test",), False),
        ("evilcdn.test", ("*.cdn.test",), False),
        ("cdn.test.evil", ("cdn.test",), False),
        ("::1", ("0:0::1",), True),
        ("127.0.0.1", ("*.0.0.1",), False),
        ("cdn.test", (), False),
    ],
)
def test_host_is_allowed(host, allowed, expected):
    assert host_is_allowed(host, allowed) is expected


@pytest.mark.parametrize(
    "address, expected",
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("::ffff:93.184.216.34", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("224.0.0.1", False),
        ("ff02::1", False),
        ("255.255.255.255", False),
        ("100.64.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),
        ("64:ff9b::a00:1", False),
    ],
)
def test_is_public_address(address, expected):
    assert is_public_address(ipaddress.ip_address(address)) is expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_images_per_request": 0},
        {"max_bytes_per_image": 0},
        {"max_pixels_per_image": 0},
        {"max_side_px": 0},
        {"fetch_timeout_s": 0},
        {"max_redirects": -1},
        {"accepted_formats": ()},
        {"accepted_formats": ("NOPE",)},
        {"allowed_hosts": ("",)},
        {"allowed_hosts": ("http://cdn.test",)},
        {"allowed_hosts": ("cdn.test:80",)},
        {"allowed_hosts": ("*.",)},
        {"allowed_hosts": ("a.*.test",)},
        {"allowed_hosts": ("*.127.0.0.1",)},
    ],
)
def test_policy_refuses_bad_settings(overrides):
    with pytest.raises(ValueError):
        ImagePolicy(**overrides)
    decoding = {k: v for k, v in overrides.items() if k in ImageLimits.__dataclass_fields__}
    if decoding:  # the encoders' limits alone refuse them too
        with pytest.raises(ValueError):
            ImageLimits(**decoding)


def test_policy_defaults():
    policy = ImagePolicy()
    assert (policy.max_images_per_request, policy.max_bytes_per_image, policy.max_pixels_per_image) == (
        8,
        20 * 1024 * 1024,
        4096 * 4096,
    )
    assert (policy.fetch_timeout_s, policy.max_redirects, policy.allowed_hosts, policy.allow_private_networks) == (
        10.0,
        3,
        (),
        False,
    )
    assert policy.accepted_formats == FORMATS


def test_bytes_checked_before_skip_the_header_parse(monkeypatch):
    """A gateway keeps the sizes of images it checked: the same bytes again give the same size and hash
    without opening them, while new bytes are still checked."""
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *args, **kwargs: opened.append(1) or real_open(fp, *args, **kwargs))
    validated = ValidatedImages(capacity=1)
    first_png = encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG")
    first_url, second_url = data_url(first_png), data_url(encode(Image.new("RGB", (20, 10)), "PNG"))
    first = asyncio.run(load_images([first_url], ImagePolicy(), validated=validated))[0]
    again = asyncio.run(load_images([first_url], ImagePolicy(), validated=validated))[0]
    assert len(opened) == 1
    assert (again.content_hash, again.width, again.height, again.data) == (first.content_hash, 40, 30, first.data)
    asyncio.run(load_images([second_url], ImagePolicy(), validated=validated))  # evicts the first (capacity 1)
    asyncio.run(load_images([first_url], ImagePolicy(), validated=validated))
    assert len(opened) == 3
    for _ in range(2):  # bad bytes are never remembered
        with pytest.raises(InvalidRequestError, match="not a PNG"):
            asyncio.run(load_images([data_url(first_png[:10])], ImagePolicy(), validated=validated))
    assert len(opened) == 5


# ----------------------------------------------------------------------------------------------
# Images named by uuid


class CountingFetcher:
    """A fetcher that must not be reached (the requests below fail before any I/O) and counts tries."""

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self, url: str, policy: ImagePolicy) -> bytes:
        self.calls += 1
        raise AssertionError(f"fetched {url}")


def _png(width: int, height: int, colour=(1, 2, 3)) -> bytes:
    return encode(Image.new("RGB", (width, height), colour), "PNG")


def test_a_uuid_alone_names_the_image_sent_under_it_earlier():
    references, scope = ImageReferences(1 << 20), reference_scope("Bearer k", None)
    png = _png(40, 30)
    [sent] = asyncio.run(
        load_images([ImageSource(data_url(png), "cat")], ImagePolicy(), references=references, scope=scope)
    )
    [named] = asyncio.run(load_images([ImageSource(None, "cat")], ImagePolicy(), references=references, scope=scope))
    # the same identity, size and bytes (what goes to the encoders), without the pixels or a decode
    assert (named.content_hash, named.width, named.height, named.data) == (sent.content_hash, 40, 30, png)
    assert references.num_bytes == len(png)


def test_an_unknown_uuid_is_a_400_before_any_fetch():
    fetcher = CountingFetcher()
    policy = ImagePolicy(allowed_hosts=("cdn.test",))
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(
            load_images(
                [ImageSource("http://cdn.test/a.png"), ImageSource(None, "dog")],
                policy,
                fetcher=fetcher,
                references=ImageReferences(1 << 20),
            )
        )
    assert info.value.message.startswith("image 2 names uuid 'dog' without an image_url")
    assert info.value.param == "messages" and fetcher.calls == 0


def test_uuids_are_private_to_the_api_key_and_cache_salt():
    references = ImageReferences(1 << 20)
    asyncio.run(
        load_images(
            [ImageSource(data_url(_png(8, 8)), "x")],
            ImagePolicy(),
            references=references,
            scope=reference_scope("Bearer alice", "s"),
        )
    )
    for credential, salt in [("Bearer bob", "s"), ("Bearer alice", None), ("Bearer alice", "t"), (None, None)]:
        with pytest.raises(InvalidRequestError, match="names uuid 'x'"):
            asyncio.run(
                load_images(
                    [ImageSource(None, "x")],
                    ImagePolicy(),
                    references=references,
                    scope=reference_scope(credential, salt),
                )
            )
    assert reference_scope("ab", "c") != reference_scope("a", "bc")  # parts cannot run into each other


def test_a_uuid_names_an_image_of_the_same_request_and_is_then_kept():
    """A uuid alone may name an image sent in another part of the same request; the uuid's first image
    is the one it names, and sending new bytes under a uuid renames it."""
    references, first, second = ImageReferences(1 << 20), _png(8, 8), _png(16, 8, (9, 9, 9))
    images = asyncio.run(
        load_images(
            [ImageSource(None, "u"), ImageSource(data_url(first), "u"), ImageSource(data_url(second), "u")],
            ImagePolicy(),
            references=references,
        )
    )
    assert [i.data for i in images] == [first, first, second]
    [later] = asyncio.run(load_images([ImageSource(None, "u")], ImagePolicy(), references=references))
    assert later.data == first
    asyncio.run(load_images([ImageSource(data_url(second), "u")], ImagePolicy(), references=references))
    assert references.get(b"", "u").data == second and len(references) == 1 and references.num_bytes == len(second)


def test_image_references_evict_the_least_recently_used_past_their_byte_budget():
    a, b, c = (LoadedImage(content_hash=name, width=1, height=1, num_bytes=100, data=bytes(100)) for name in "abc")
    references = ImageReferences(250)
    references.put(b"", "a", a)
    references.put(b"", "b", b)
    assert references.get(b"", "a") is not None  # a is now the most recently used
    references.put(b"", "c", c)  # 300 bytes: b goes
    assert references.get(b"", "b") is None and references.num_bytes == 200
    assert {references.get(b"", u).content_hash for u in "ac"} == {"a", "c"}
    big = LoadedImage(content_hash="big", width=1, height=1, num_bytes=300, data=bytes(300))
    references.put(b"", "a", big)  # over the whole budget: not kept, and "a" no longer names the old image
    assert references.get(b"", "a") is None and references.num_bytes == 100
    off = ImageReferences(0)
    off.put(b"", "a", a)
    assert off.get(b"", "a") is None and off.num_bytes == 0


def _sources(*parts) -> list[ImageSource]:
    from services.gateway.prompts import image_sources
    from services.gateway.protocol import ChatMessage

    return image_sources([ChatMessage.model_validate({"role": "user", "content": list(parts)})])


def test_image_parts_give_their_url_and_uuid_or_a_clear_400():
    url = data_url(TINY_PNG)
    assert _sources(
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}, "uuid": "a"},
        {"type": "image_url", "image_url": None, "uuid": "a"},
        {"type": "image_url", "uuid": "b"},
        {"type": "image_url", "image_url": {"detail": "low"}, "uuid": "c"},
    ) == [
        ImageSource(url),
        ImageSource(url, "a"),
        ImageSource(None, "a"),
        ImageSource(None, "b"),
        ImageSource(None, "c"),
    ]
    for bad in [
        {"type": "image_url"},
        {"type": "image_url", "image_url": None},
        {"type": "image_url", "image_url": {"url": 7}, "uuid": "a"},
        {"type": "image_url", "image_url": {"url": url}, "uuid": 7},
        {"type": "image_url", "image_url": {"url": url}, "uuid": ""},
        {"type": "image_url", "image_url": None, "uuid": "x" * 257},
    ]:
        with pytest.raises(InvalidRequestError, match=r"^messages\[0\]: an image_url part") as info:
            _sources(bad)
        assert info.value.param == "messages"
