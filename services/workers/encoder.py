"""The encode stage's compute: encoded image bytes -> embedding rows, with an LRU embedding cache.

    start(items)  -> EncodeBatch       the owner thread; returns at once
      1. each distinct content hash not cached now: its preprocessing is submitted to a thread pool:
         check that the bytes hash to `ref.content_hash` (a wrong hash would poison the cache), decode
         them once (services.common.images, at reduced scale when a JPEG allows, see below), the model's
         image processor -> pixel inputs (+ Qwen2-VL's patch grid)
    finish(batch) -> per item: rows | why not     the owner thread; blocks
      2. one cache lookup per distinct content hash         hit: the cached rows, no tower run
      3. each miss: its preprocessing's outcome (waited for; done here if it was cached at `start` and
         has been evicted since); every miss through the vision tower + projector in ONE
         `VisionEncoder.encode` call; the rows are cached under the content hash (with their patch grid)
      4. per image: the rows, or an error string when the bytes do not decode, the rows do not
         match `ref.length` or the grid does not match `ref.grid_thw`
    encode(items) = finish(start(items))           the serial path (a colocated worker)

Splitting the call lets an encode loop preprocess batch N+1 while the tower runs on batch N
(services.workers.encode_worker). The results are those of the serial path: lookups, tower calls and
cache puts happen in `finish`, in the order the batches were started.

A bad image never fails its neighbours: decoding and preprocessing are per image, and only a failing
tower call fails the images that were in it (cache hits of the same call are still served).

Draft decoding (`image_draft_decode`, on by default): a JPEG is decoded by the JPEG decoder's own 1/2,
1/4 or 1/8-scale IDCT (Pillow's `Image.draft`) at the largest reduction that leaves it at least as large
as the image processor resizes it to (MultiModalProcessor.draft_scale: CLIP's shortest edge, SigLIP's
fixed size, Qwen2-VL's smart_resize, whose patch grid must not change). A 4000x3000 photo for LLaVA-1.5
(CLIP, shortest edge 336 -> 448x336) is decoded at 1/8, 500x375. The pixels are not bit-equal to a full
decode followed by the resize; tests that compare with transformers feed it the same decoded image, or
turn drafting off.

Embeddings stay on the encoder's device, in the dtype the encoder was built with (the LM's dtype), and
are owned by the cache: callers must not write into them.

Tunables (defaults):
    cache_capacity_bytes = 1 GiB   embedding bytes the cache holds (tensor nbytes; on the device)
    preprocess_threads = min(8, cores)   images decoded and preprocessed at once
    image_draft_decode = True      JPEGs decoded at reduced scale where the processor allows
    encode seconds buckets          1 ms .. 10 s (services.common.histogram): from `start` to the end of
                                    `finish` of a batch with misses (preprocessing, any wait behind the
                                    batch ahead, the tower)
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    num_images_drafted: int = 0  # of those, JPEGs decoded at reduced scale
    num_tower_calls: int = 0
    num_errors: int = 0  # images answered with an error
    seconds: SecondsHistogram = field(default_factory=SecondsHistogram)  # a batch with misses, start to finish


# ----------------------------------------------------------------------------------------------
# A batch in progress


@dataclass(frozen=True)
class _Prepared:
    """What preprocessing made of one content hash's items (indices into the batch)."""

    content_hash: str
    index: int | None  # the item whose bytes were used; None: no item's bytes have the hash
    outcome: ImageItem | str | None  # its pixel inputs, or why its image cannot be encoded
    mislabeled: dict[int, str]  # item index -> why its bytes cannot be used (the items before `index`)
    draft_scale: int = 1  # the reduction its image was decoded at
    preprocess_s: float = 0.0  # hashing, decoding and preprocessing it took on the pool's thread


class EncodeBatch:
    """Items `ImageEncoder.start` took, and the preprocessing of the content hashes that were not cached
    then (futures of the encoder's pool, one per hash). Owned by the thread that started it."""

    def __init__(self, items: Sequence[tuple[ImageRef, bytes]], preparing: dict[str, Future[_Prepared]]) -> None:
        self.items = list(items)
        self.preparing = preparing
        self.discarded: set[int] = set()  # indices of items no longer wanted (their request was aborted)
        self.started_s = time.perf_counter()
        # set by `finish`: content hash -> its preprocessing's seconds (misses only), and `finish`'s end
        self.preprocess_s: dict[str, float] = {}
        self.finished_s: float | None = None

    def item_seconds(self, content_hash: str) -> tuple[float, float]:
        """(decode s, encode s) of a finished batch's image: its preprocessing (0 when it was served from
        the cache), and the rest of start -> finish (the wait behind the batch ahead, the tower)."""
        total_s = (self.finished_s or self.started_s) - self.started_s
        decode_s = min(self.preprocess_s.get(content_hash, 0.0), total_s)
        return decode_s, total_s - decode_s

    def __len__(self) -> int:
        """Items still wanted."""
        return len(self.items) - len(self.discarded)

    def discard(self, indices: Iterable[int]) -> None:
        """Drop these items: `finish` leaves them out of its results, and the preprocessing that only they
        needed is cancelled (a task already running finishes unread)."""
        self.discarded.update(indices)
        wanted = {ref.content_hash for i, (ref, _) in enumerate(self.items) if i not in self.discarded}
        for content_hash in [h for h in self.preparing if h not in wanted]:
            self.preparing.pop(content_hash).cancel()

    def wanted(self) -> list[tuple[int, ImageRef, bytes]]:
        return [(i, ref, data) for i, (ref, data) in enumerate(self.items) if i not in self.discarded]


# ----------------------------------------------------------------------------------------------
# The encoder


class ImageEncoder:
    """Image preprocessing + vision tower + projector of one model, and its embedding cache.

    `start`, `finish` and `encode` are called from one thread (the encode loop), which owns the cache;
    preprocessing runs on the encoder's own pool and touches neither cache nor counters. `stats` and the
    cache counters may be read from other threads.
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
        image_draft_decode: bool = True,
    ) -> None:
        if isinstance(dtype, str):  # a resolved EngineConfig.dtype name ("auto" is resolved by the caller)
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        self.processor = MultiModalProcessor.from_model_dir(model_dir)
        self.vision = VisionEncoder.from_model_dir(model_dir, device, dtype, load_format)
        self.cache = EmbeddingCache(cache_capacity_bytes)
        self.image_limits = image_limits or ImageLimits()  # should be the gateway's: it accepted these images
        self.image_draft_decode = image_draft_decode
        self.stats = EncodeStats()
        self._preprocessing = ThreadPoolExecutor(max_workers=preprocess_threads, thread_name_prefix="preprocess")
        self._unfinished: list[EncodeBatch] = []  # started, not yet finished, oldest first

    @property
    def device(self) -> torch.device:
        return self.vision.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.dtype

    def encode(self, items: Sequence[tuple[ImageRef, bytes]]) -> list[torch.Tensor | str]:
        """Per image, in order: its rows [ref.length, lm_hidden_size] (on the device), or why it failed."""
        return self.finish(self.start(items))

    def start(self, items: Sequence[tuple[ImageRef, bytes]]) -> EncodeBatch:
        """Submit the preprocessing of every image whose content hash is not cached now; returns at once."""
        candidates: dict[str, list[tuple[int, ImageRef, bytes]]] = {}  # content hash -> its items, in order
        for index, (ref, data) in enumerate(items):
            candidates.setdefault(ref.content_hash, []).append((index, ref, data))
        preparing = {
            h: self._preprocessing.submit(self._prepare, these)
            for h, these in candidates.items()
            # not cached (a peek: the lookup that counts is finish's), nor being prepared for a batch ahead
            # (finished first, that batch caches it)
            if h not in self.cache and not any(h in ahead.preparing for ahead in self._unfinished)
        }
        batch = EncodeBatch(items, preparing)
        self._unfinished.append(batch)
        return batch

    def finish(self, batch: EncodeBatch) -> list[torch.Tensor | str]:
        """Per item still wanted, in order: its rows, or why it failed. Blocks for the batch's preprocessing
        and its tower call.

        An image whose content hash is cached, or already taken from another item of this batch, is served
        by its hash. Any other image's bytes must hash to its content hash: the rows are cached under that
        hash, so a wrong one would poison the cache.
        """
        self._unfinished.remove(batch)
        wanted = batch.wanted()
        candidates: dict[str, list[tuple[int, ImageRef, bytes]]] = {}
        for item in wanted:
            candidates.setdefault(item[1].content_hash, []).append(item)
        found: dict[str, CachedEmbedding | str] = {}
        prepared: list[_Prepared] = []
        for h, these in candidates.items():  # one lookup per distinct hash, in the order of the items
            entry = self.cache.get(h)
            future = batch.preparing.pop(h, None)
            if entry is not None:
                found[h] = entry
                if future is not None:
                    future.cancel()  # cached meanwhile, by the batch ahead
            else:  # its preprocessing, or done now (cached at start and evicted since, or failed for the batch ahead)
                prepared.append(future.result() if future is not None else self._prepare(these))
        mislabeled = {index: why for p in prepared for index, why in p.mislabeled.items()}
        prepared.sort(key=lambda p: -1 if p.index is None else p.index)  # the tower takes misses in item order
        found.update(self._run_prepared(prepared))
        batch.preprocess_s = {p.content_hash: p.preprocess_s for p in prepared}
        batch.finished_s = time.perf_counter()
        if prepared:
            self.stats.seconds.observe(batch.finished_s - batch.started_s)
        results = [
            mislabeled[index] if index in mislabeled else _matched(ref, found[ref.content_hash])
            for index, ref, _ in wanted
        ]
        self.stats.num_errors += sum(isinstance(r, str) for r in results)
        return results

    # ------------------------------------------------------------------ preprocessing (the pool's threads)

    def _prepare(self, candidates: list[tuple[int, ImageRef, bytes]]) -> _Prepared:
        """The first of one content hash's items whose bytes have that hash, decoded and preprocessed."""
        mislabeled: dict[int, str] = {}
        started_s = time.perf_counter()
        for index, ref, data in candidates:
            actual = encoded_content_hash(data)
            if actual != ref.content_hash:
                mislabeled[index] = f"the image's bytes hash to {actual}, not to its content hash {ref.content_hash}"
                continue
            outcome, draft_scale = self._preprocess(ref, data)
            elapsed_s = time.perf_counter() - started_s
            return _Prepared(ref.content_hash, index, outcome, mislabeled, draft_scale, elapsed_s)
        return _Prepared(candidates[0][1].content_hash, None, None, mislabeled, 1, time.perf_counter() - started_s)

    def _preprocess(self, ref: ImageRef, data: bytes) -> tuple[ImageItem | str, int]:
        """Decode and preprocess one image, or say why it cannot be; and the reduction it was decoded at."""
        draft_scale = self.processor.draft_scale if self.image_draft_decode else None
        try:
            decoded = decode_image_bytes(data, self.image_limits, label="it", draft_scale=draft_scale)
        except InvalidRequestError as exc:
            return exc.message, 1
        try:
            # the processor's own per-image preprocessing, so the pixels equal MultiModalProcessor.process's
            (pixel_values,), (grid,) = self.processor.pixel_inputs([decoded.image])
        except Exception as exc:  # a processor failure on one image must not fail the others
            logger.warning("preprocessing image %s failed: %s", ref.content_hash, traceback.format_exc())
            return f"the image could not be preprocessed: {exc}", decoded.draft_scale
        # the rows the tower will yield (ImageItem.length), as the processor counts them for a prompt
        if grid is not None:
            length = num_merged_tokens(grid, self.processor.spec.spatial_merge_size)
        else:
            length = self.processor.num_image_tokens(decoded.width, decoded.height)
        return ImageItem(ref.content_hash, ref.offset, length, pixel_values, grid), decoded.draft_scale

    # ------------------------------------------------------------------ the tower (the owner thread)

    def _run_prepared(self, prepared: list[_Prepared]) -> dict[str, CachedEmbedding | str]:
        """Content hash -> rows or why not, for each prepared miss: one tower call for the preprocessed."""
        found: dict[str, CachedEmbedding | str] = {}
        found.update((p.content_hash, p.outcome) for p in prepared if isinstance(p.outcome, str))
        items = [p.outcome for p in prepared if isinstance(p.outcome, ImageItem)]
        if items:
            found.update(self._run_tower(items))
        self.stats.num_images_drafted += sum(p.draft_scale > 1 for p in prepared)
        return found

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
