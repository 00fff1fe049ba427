"""The encode stage's compute: encoded image bytes -> embedding rows, with an LRU embedding cache.

    encode([(ref, bytes), ...])
      1. one cache lookup per distinct content hash          hit: the cached rows, no tower run
      2. each miss (once per distinct hash): check that its bytes hash to `ref.content_hash` (a wrong
         hash would poison the cache), decode them (the gateway's checks, again), the model's image
         processor -> pixel inputs (+ Qwen2-VL's patch grid)
      3. every miss through the vision tower + projector in ONE `VisionEncoder.encode` call;
         the rows are cached under the content hash (with the patch grid they came from)
      4. per image: the rows, or an error string when the bytes do not decode, the rows do not
         match `ref.length` or the grid does not match `ref.grid_thw`

A bad image never fails its neighbours: decoding and preprocessing are per image, and only a failing
tower call fails the images that were in it (cache hits of the same call are still served).

Embeddings stay on the encoder's device, in the dtype the encoder was built with (the LM's dtype), and
are owned by the cache: callers must not write into them.

Tunables (defaults):
    cache_capacity_bytes = 1 GiB   embedding bytes the cache holds (tensor nbytes; on the device)
    encode seconds buckets          1 ms .. 10 s (services.common.histogram), one encode() call that ran the tower
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from services.common.errors import InvalidRequestError
from services.common.histogram import SecondsHistogram
from services.common.images import ImageLimits, decode_image_bytes, encoded_content_hash
from services.common.lru import BytesLRU
from services.common.messages import ImageRef
from services.engine.config import DTYPES
from services.engine.multimodal import ImageItem, MultiModalProcessor, VisionEncoder
from services.engine.multimodal.mrope import GridTHW, num_merged_tokens

logger = logging.getLogger(__name__)

DEFAULT_CACHE_CAPACITY_BYTES = 2**30
PREPROCESS_THREADS = min(8, os.cpu_count() or 1)  # images decoded and resized at once


# ----------------------------------------------------------------------------------------------
# The embedding cache


@dataclass(frozen=True)
class CachedEmbedding:
    rows: torch.Tensor  # [num_rows, lm_hidden_size], owns its storage (never a view of a batch)
    grid_thw: GridTHW | None = None  # the patch grid the rows came from (Qwen2-VL); None for LLaVA

    @property
    def num_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


class EmbeddingCache:
    """Least-recently-used image embeddings by content hash, bounded by their bytes.

    `get` counts a query (and a hit) and makes a hit the most recently used; `put` evicts from the
    least recently used end until the new entry fits. An entry larger than the whole budget is not
    cached. Not thread-safe: one owner (the encode loop); other threads may read the counters.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self._entries: BytesLRU[str, CachedEmbedding] = BytesLRU(capacity_bytes, lambda e: e.num_bytes)
        self.num_queries = 0
        self.num_hits = 0
        self.num_evictions = 0
        self.version = 0  # grows with every put: which hashes are cached may have changed (state publisher)

    @property
    def capacity_bytes(self) -> int:
        return self._entries.capacity_bytes

    @property
    def num_bytes_used(self) -> int:
        return self._entries.num_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, content_hash: str) -> bool:
        """A peek: counts nothing and leaves the recency order alone."""
        return content_hash in self._entries

    def hashes(self) -> list[str]:
        """Cached content hashes, least recently used first."""
        return self._entries.keys()

    def get(self, content_hash: str) -> CachedEmbedding | None:
        self.num_queries += 1
        entry = self._entries.get(content_hash)
        if entry is not None:
            self.num_hits += 1
        return entry

    def put(self, content_hash: str, rows: torch.Tensor, grid_thw: GridTHW | None = None) -> list[str]:
        """Cache `rows` (replacing an entry of the same hash); returns the hashes evicted for room, in order."""
        evicted = self._entries.put(content_hash, CachedEmbedding(rows, grid_thw))
        self.num_evictions += len(evicted)
        self.version += 1
        return evicted


# ----------------------------------------------------------------------------------------------
# Counters


@dataclass
class EncodeStats:
    """Counters an encode worker exports (tristage:encode_* metrics); cache counters live on the cache."""

    num_images_encoded: int = 0  # images run through the tower
    num_tower_calls: int = 0
    num_errors: int = 0  # images answered with an error
    seconds: SecondsHistogram = field(default_factory=SecondsHistogram)  # one call with misses, tower included


# ----------------------------------------------------------------------------------------------
# The encoder


class ImageEncoder:
    """Image preprocessing + vision tower + projector of one model, and its embedding cache.

    `encode` is called from one thread (the encode loop); `stats` and the cache counters may be read
    from others.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        load_format: str = "auto",
        cache_capacity_bytes: int = DEFAULT_CACHE_CAPACITY_BYTES,
        image_limits: ImageLimits | None = None,
        preprocess_threads: int = PREPROCESS_THREADS,
    ) -> None:
        if isinstance(dtype, str):  # a resolved EngineConfig.dtype name ("auto" is resolved by the caller)
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        self.processor = MultiModalProcessor.from_model_dir(model_dir)
        self.vision = VisionEncoder.from_model_dir(model_dir, device, dtype, load_format)
        self.cache = EmbeddingCache(cache_capacity_bytes)
        self.image_limits = image_limits or ImageLimits()  # should be the gateway's: it accepted these images
        self.stats = EncodeStats()
        self._preprocessing = ThreadPoolExecutor(max_workers=preprocess_threads, thread_name_prefix="preprocess")

    @property
    def device(self) -> torch.device:
        return self.vision.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.dtype

    def encode(self, items: Sequence[tuple[ImageRef, bytes]]) -> list[torch.Tensor | str]:
        """Per image, in order: its rows [ref.length, lm_hidden_size] (on the device), or why it failed.

        An image whose content hash is cached, or already taken from another item of this call, is served
        by its hash. Any other image's bytes must hash to its content hash before they are decoded: the
        rows are cached under that hash, so a wrong one would poison the cache.
        """
        start = time.perf_counter()
        hits: dict[str, CachedEmbedding] = {}
        misses: dict[str, tuple[ImageRef, bytes]] = {}  # content hash -> the first item whose bytes have it
        mislabeled: dict[int, str] = {}  # item index -> why its bytes cannot be used
        looked_up: set[str] = set()
        for index, (ref, data) in enumerate(items):
            h = ref.content_hash
            if h not in looked_up:  # one lookup per distinct hash
                looked_up.add(h)
                entry = self.cache.get(h)
                if entry is not None:
                    hits[h] = entry
            if h in hits or h in misses:
                continue
            actual = encoded_content_hash(data)
            if actual != h:
                mislabeled[index] = f"the image's bytes hash to {actual}, not to its content hash {h}"
            else:
                misses[h] = (ref, data)
        found: dict[str, CachedEmbedding | str] = {**hits, **self._encode_misses(list(misses.values()))}
        if misses:
            self.stats.seconds.observe(time.perf_counter() - start)
        results = [
            mislabeled[i] if i in mislabeled else _matched(ref, found[ref.content_hash])
            for i, (ref, _) in enumerate(items)
        ]
        self.stats.num_errors += sum(isinstance(r, str) for r in results)
        return results

    # ------------------------------------------------------------------ misses

    def _encode_misses(self, misses: list[tuple[ImageRef, bytes]]) -> dict[str, CachedEmbedding | str]:
        found: dict[str, CachedEmbedding | str] = {}
        prepared: list[ImageItem] = []
        # decoding and resizing (Pillow, which releases the GIL) run side by side: for megapixel images
        # they, not the tower, bound an encoder's rate
        outcomes = self._preprocessing.map(lambda miss: self._prepare(*miss), misses)
        for (ref, _), outcome in zip(misses, outcomes):
            if isinstance(outcome, str):
                found[ref.content_hash] = outcome
            else:
                prepared.append(outcome)
        if prepared:
            found.update(self._run_tower(prepared))
        return found

    def _prepare(self, ref: ImageRef, data: bytes) -> ImageItem | str:
        """Decode and preprocess one image, or say why it cannot be."""
        try:
            loaded = decode_image_bytes(data, self.image_limits)
        except InvalidRequestError as exc:
            return exc.message
        assert loaded.image is not None  # decode_image_bytes is given no ValidatedImages: it always decodes the pixels
        try:
            # the processor's own per-image preprocessing, so the pixels equal MultiModalProcessor.process's
            (pixel_values,), (grid,) = self.processor.pixel_inputs([loaded.image])
        except Exception as exc:  # a processor failure on one image must not fail the others
            logger.warning("preprocessing image %s failed: %s", ref.content_hash, traceback.format_exc())
            return f"the image could not be preprocessed: {exc}"
        # the rows the tower will yield (ImageItem.length), as the processor counts them for a prompt
        if grid is not None:
            length = num_merged_tokens(grid, self.processor.spec.spatial_merge_size)
        else:
            length = self.processor.num_image_tokens(loaded.width, loaded.height)
        return ImageItem(ref.content_hash, ref.offset, length, pixel_values, grid)

    def _run_tower(self, prepared: list[ImageItem]) -> dict[str, CachedEmbedding | str]:
        """One tower call for every prepared miss; the rows are cached. A failing call fails its images."""
        self.stats.num_tower_calls += 1
        try:
            outputs = self.vision.encode(prepared)
        except Exception as exc:
            logger.error("the vision tower failed on %d image(s): %s", len(prepared), traceback.format_exc())
            return {item.content_hash: f"the vision encoder failed: {exc}" for item in prepared}
        self.stats.num_images_encoded += len(prepared)
        found: dict[str, CachedEmbedding | str] = {}
        for item, rows in zip(prepared, outputs):
            # clone: a row block is a view of the whole batch's output, which it would keep alive
            rows = rows.to(self.dtype).clone()  # [length, lm_hidden_size]
            self.cache.put(item.content_hash, rows, item.image_grid_thw)
            found[item.content_hash] = CachedEmbedding(rows, item.image_grid_thw)
        return found


def _matched(ref: ImageRef, found: CachedEmbedding | str) -> torch.Tensor | str:
    """The rows when they fit the placeholder run the request reserved, else why not."""
    if isinstance(found, str):
        return found
    num_rows = found.rows.shape[0]
    if num_rows != ref.length:
        return f"the image yields {num_rows} embedding rows but its placeholder run is {ref.length} tokens"
    ref_grid = tuple(ref.grid_thw) if ref.grid_thw is not None else None
    if ref_grid != found.grid_thw:
        return f"the image's patch grid is {_grid(found.grid_thw)}, but the request gives {_grid(ref_grid)}"
    return found.rows


def _grid(grid: GridTHW | tuple[int, ...] | None) -> str:
    return "none" if grid is None else "x".join(map(str, grid))
