"""Images for multimodal requests, as base64 data URLs.

ImagePool.draw(k) gives a request's k images. Each one repeats an image already sent with
probability `repeat_ratio` (chosen uniformly among those sent, so an encoder cache can hit), and
is new otherwise:
    generated   Pillow draws random colour blobs (uniform noise on a 1/16-size grid, bilinearly
                upscaled) of a size picked uniformly from `sizes`: every image is distinct, and
                compresses to a realistic size (tens of kB at 512x512 in JPEG)
    from a dir  the next file of `image_dir` (.png, .jpg, .jpeg, .webp, .gif, sorted by name,
                cycling), sent as it is
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
}
BLOB_SCALE = 16
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ImageConfig:
    images_per_request: int = 1
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height) in pixels
    repeat_ratio: float = 0.0
    image_format: str = "jpeg"  # jpeg or png, for generated images
    image_dir: str | None = None


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'512x512,1024x768' -> ((512, 512), (1024, 768))."""
    sizes = []
    for item in filter(None, text.split(",")):
        width, _, height = item.lower().partition("x")
        sizes.append((int(width), int(height)))
    if not sizes or any(w < 1 or h < 1 for w, h in sizes):
        raise ValueError(f"image sizes must be WxH[,WxH...], got {text!r}")
    return tuple(sizes)


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def generate_image(width: int, height: int, image_format: str, rng: np.random.Generator) -> str:
    from PIL import Image

    grid = rng.integers(0, 256, size=(height // BLOB_SCALE + 2, width // BLOB_SCALE + 2, 3), dtype=np.uint8)
    image = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
        return _data_url(buffer.getvalue(), "image/png")
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return _data_url(buffer.getvalue(), "image/jpeg")


class ImagePool:
    def __init__(self, config: ImageConfig, rng: np.random.Generator) -> None:
        self._config = config
        self._rng = rng
        self._sent: list[str] = []
        self._files: list[Path] = []
        if config.image_dir:
            self._files = sorted(p for p in Path(config.image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {config.image_dir}")
        self._num_new = 0

    def draw(self) -> tuple[str, ...]:
        """One request's images."""
        return tuple(self._one() for _ in range(self._config.images_per_request))

    def _one(self) -> str:
        if self._sent and self._rng.random() < self._config.repeat_ratio:
            return self._sent[int(self._rng.integers(len(self._sent)))]
        image = self._new()
        self._sent.append(image)
        return image

    def _new(self) -> str:
        self._num_new += 1
        if self._files:
            path = self._files[(self._num_new - 1) % len(self._files)]
            return _data_url(path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()])
        width, height = self._config.sizes[int(self._rng.integers(len(self._config.sizes)))]
        return generate_image(width, height, self._config.image_format, self._rng)
