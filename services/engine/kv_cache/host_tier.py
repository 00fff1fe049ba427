"""A host-memory tier under the device prefix cache (LayerKV's host pool, as vLLM's CPU offloading
connector and SGLang's HiCache keep whole blocks there).

Full blocks the device pool evicts keep their KV in host memory instead of being dropped; a later
prefix hit that runs past the device's cached prefix copies them back into fresh device blocks
instead of recomputing them:

    request's blocks:  | b0 | b1 | b2 | b3 | b4 | b5 |
                       |<- device hit ->|<- host hit ->|<- computed ->
                                        copied host -> device before the step's forward

Three parts:
  * HostBlockPool: bookkeeping, no tensors. `num_blocks` slots; block hash -> HostBlock (slot, tokens,
    parent hash, extra keys) in LRU order; it emits BlockStored / BlockRemoved with medium="CPU".
  * KVCopyPlan: the copies planned since the last flush: offloads (device block -> host slot) and
    onloads (host slot -> device block).
  * HostKVBuffer: the bytes, [num_blocks, layers, k|v, block_size, kv_heads, head_dim] (one slot is
    one device block's KV for every layer, contiguous), page-locked on CUDA (see _page_locked_empty);
    it issues a plan's copies.

Ordering (why no synchronisation is needed). The engine flushes the plan right after the scheduling
(or KV import) that made it, on the stream its forward runs on, before that forward; copies of a plan
go offloads first, then onloads. So, in stream order:
  * an evicted device block is read (offload) after every step already queued wrote it and before
    the step that reuses the slot overwrites it (asynchronous scheduling included: the step in flight
    was queued before);
  * a device block both evicted and reused for a restore in one plan is read before it is written;
  * a host slot is read by an onload after any offload that wrote it (earlier plans, or this one);
  * a host slot with a planned onload is pinned until the plan is taken, so no offload of the same
    plan can reuse it (an offload would go first and overwrite the bytes the onload must read);
  * a slot offloaded twice in one plan (evicted again within it) is copied once, for its last owner.
Host bytes are only ever read by copies on that stream; a CPU reader would have to synchronise first.

Tunables: the tier's size, EngineConfig.kv_offloading_size (GiB; 0: off), gives
`num_blocks = floor(bytes / bytes of one block across all layers, k and v)`; COPY_CHUNK_BLOCKS bounds
the device staging memory of one gather or scatter.
"""

from __future__ import annotations

import math
import mmap
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.common.kv_events import BlockRemoved, BlockStored, KVEvent

HOST_MEDIUM = "CPU"  # KV events' medium for this tier (vLLM's name; the device tier's is None)
# Blocks gathered (offload) or staged (onload) on the device at once: bounds the temporary device
# memory of a flush to this many blocks (Llama-3.1-8B in bf16: 2 MiB a block of 16 tokens, 128 MiB).
COPY_CHUNK_BLOCKS = 64


@dataclass(eq=False)
class HostBlock:
    slot: int  # index into HostKVBuffer.blocks
    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]  # re-checked on every hit, as the device pool's
    extra_keys: list[str] | None  # as the device BlockStored carried them
    num_pins: int = 0  # onloads planned from it and not yet issued: it is not evictable while > 0


@dataclass
class KVCopyPlan:
    """Copies between the tiers that allocations planned and nobody issued yet."""

    offloads: dict[int, int] = field(default_factory=dict)  # host slot -> device block id (last writer wins)
    onloads: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device block id)

    def __bool__(self) -> bool:
        return bool(self.offloads or self.onloads)


class HostBlockPool:
    """The host tier's slots and its LRU map of cached blocks. Every entry is cached only: no request
    references a host block (a restore copies it into a device block the request holds)."""

    def __init__(self, num_blocks: int, block_size: int, emit: Callable[[KVEvent], None]) -> None:
        if num_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._emit = emit  # the device pool's event list: one ordered stream for both tiers
        self._free_slots = list(range(num_blocks - 1, -1, -1))  # popped from the end: slots 0, 1, ... first
        self._lru: OrderedDict[int, HostBlock] = OrderedDict()  # block hash -> block; front: evicted first

    @property
    def num_used_blocks(self) -> int:
        return len(self._lru)

    @property
    def num_free_blocks(self) -> int:
        """Slots holding no KV."""
        return len(self._free_slots)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(1 for b in self._lru.values() if b.num_pins)

    def usage(self) -> float:
        """Fraction of slots holding KV."""
        return self.num_used_blocks / self.num_blocks

    def contains(self, block_hash: int) -> bool:
        """A block with this hash is held (its tokens not re-checked: see lookup)."""
        return block_hash in self._lru

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> HostBlock | None:
        """The held block with this hash whose tokens really match, or None. Does not reorder the LRU."""
        block = self._lru.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, block_hash: int) -> None:
        """Mark a held block most recently used."""
        if block_hash in self._lru:
            self._lru.move_to_end(block_hash)

    def store(
        self, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...], extra_keys: list[str] | None
    ) -> int | None:
        """Take a slot for a block (evicting the least recently used unpinned one when full); its slot, or
        None when the hash is held already or every slot is pinned."""
        if block_hash in self._lru:
            self._lru.move_to_end(block_hash)
            return None
        if not self._free_slots and not self._evict_lru():
            return None
        slot = self._free_slots.pop()
        self._lru[block_hash] = HostBlock(slot, block_hash, parent_hash, token_ids, extra_keys)
        keys: list[list[str] | None] | None = [extra_keys] if extra_keys else None
        self._emit(
            BlockStored(
                [block_hash], parent_hash, list(token_ids), self.block_size, medium=HOST_MEDIUM, extra_keys=keys
            )
        )
        return slot

    def pin(self, blocks: Sequence[HostBlock]) -> None:
        """Keep blocks whose onload is planned (and mark them used); `unpin` once the plan is issued."""
        for block in blocks:
            block.num_pins += 1
            self._lru.move_to_end(block.block_hash)

    def unpin(self, blocks: Sequence[HostBlock]) -> None:
        for block in blocks:
            assert block.num_pins > 0, f"host block {block.slot} unpinned twice"
            block.num_pins -= 1

    def clear(self) -> None:
        """Forget every block (the device pool's AllBlocksCleared covers this tier too)."""
        assert not any(b.num_pins for b in self._lru.values()), "clearing the host tier with onloads planned"
        self._lru.clear()
        self._free_slots = list(range(self.num_blocks - 1, -1, -1))

    def cached_hashes(self) -> list[int]:
        """Every block hash the tier holds now (a snapshot for routers that fell behind)."""
        for _ in range(8):  # another thread may be changing the map: retry the copy, as BlockPool's
            try:
                return list(self._lru)
            except RuntimeError:
                continue
        return []

    def _evict_lru(self) -> bool:
        victim = next((b for b in self._lru.values() if not b.num_pins), None)
        if victim is None:
            return False
        del self._lru[victim.block_hash]
        self._free_slots.append(victim.slot)
        self._emit(BlockRemoved([victim.block_hash], medium=HOST_MEDIUM))
        return True


class HostKVBuffer:
    """The host tier's bytes and the copies in and out of the device cache.

    `kv_cache` below is the runner's [layers, k|v, blocks, block_size, kv_heads, head_dim] tensor. Copies
    are queued on the current stream (non_blocking, pinned host memory on CUDA; plain copies on CPU).
    """

    def __init__(self, num_blocks: int, block_shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, *block_shape)  # [num_blocks, layers, k|v, block_size, kv_heads, head_dim]
        self._unlock: Callable[[], object] | None = None  # unregisters the page-locked range, once
        if device.type == "cuda":
            self.blocks, self._unlock = _page_locked_empty(shape, dtype, device)
            # non_blocking copies are asynchronous DMA only from and to page-locked memory
            assert self.blocks.is_pinned(), "the host KV tier's memory is not page-locked"
        else:  # a CPU engine: ordinary memory, plain copies
            self.blocks = torch.empty(shape, dtype=dtype)
        self.device = device

    def close(self) -> None:
        """Unlock the pages now (once every queued copy is done) rather than when `blocks` is collected."""
        if self._unlock is not None:
            self._unlock()

    @property
    def bytes_per_block(self) -> int:
        return self.blocks[0].numel() * self.blocks.element_size()

    def issue(self, kv_cache: torch.Tensor, plan: KVCopyPlan) -> None:
        """Queue a plan's copies: every offload before any onload (see the module's ordering notes)."""
        offloads = sorted(plan.offloads.items())  # by host slot: consecutive slots go in one copy
        for lo in range(0, len(offloads), COPY_CHUNK_BLOCKS):
            chunk = offloads[lo : lo + COPY_CHUNK_BLOCKS]
            self._save(kv_cache, [block_id for _, block_id in chunk], [slot for slot, _ in chunk])
        onloads = sorted(plan.onloads)
        for lo in range(0, len(onloads), COPY_CHUNK_BLOCKS):
            chunk = onloads[lo : lo + COPY_CHUNK_BLOCKS]
            self._load(kv_cache, [slot for slot, _ in chunk], [block_id for _, block_id in chunk])

    def _save(self, kv_cache: torch.Tensor, block_ids: list[int], slots: list[int]) -> None:
        """One gather of the device blocks, then one device -> host copy per run of consecutive slots."""
        by_block = kv_cache.permute(2, 0, 1, 3, 4, 5)  # [blocks, layers, k|v, block_size, kv_heads, head_dim]
        staged = by_block.index_select(0, self._index(block_ids))  # [n, layers, ...], contiguous
        for start, end in _runs(slots):
            self.blocks[slots[start] : slots[start] + end - start].copy_(staged[start:end], non_blocking=True)

    def _load(self, kv_cache: torch.Tensor, slots: list[int], block_ids: list[int]) -> None:
        """One host -> device copy per run of consecutive slots into a staging tensor, then one scatter."""
        staged = torch.empty((len(slots), *self.blocks.shape[1:]), dtype=self.blocks.dtype, device=self.device)
        for start, end in _runs(slots):
            staged[start:end].copy_(self.blocks[slots[start] : slots[start] + end - start], non_blocking=True)
        # [n, layers, k|v, ...] -> [layers, k|v, n, ...] to scatter over the device cache's block dim
        kv_cache.index_copy_(2, self._index(block_ids), staged.permute(1, 2, 0, 3, 4, 5))

    def _index(self, ids: list[int]) -> torch.Tensor:
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        if self.device.type == "cuda":  # through pinned memory: a pageable copy would wait for the stream
            return index.pin_memory().to(self.device, non_blocking=True)
        return index


def _page_locked_empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, Callable[[], object]]:
    """An uninitialised host tensor whose exact byte range is page-locked, and the finalizer that unlocks it.

    Not `torch.empty(..., pin_memory=True)`: PyTorch's caching host allocator rounds every allocation up
    to a power of two (a 56 GiB tier would lock 64 GiB of RAM) and keeps the block cached after it is
    freed. Instead the bytes are ordinary memory of exactly the tier's size, registered with
    cudaHostRegister, so non_blocking copies from and to it are true asynchronous DMA (`is_pinned()`
    reports True: it asks cudaPointerGetAttributes, which says cudaMemoryTypeHost for registered
    memory). The memory is a private anonymous mapping of its own: what malloc gives a large allocation,
    but also for a small tier, page-aligned and sharing no page with other heap data (so two tiers of
    one process never register the same page). Registering faults in and locks every page at once.

    Copies do not keep the memory alive (the caching allocator's stream events do not cover it), so
    the finalizer, run by close() or when the tensor is collected, waits for the device before it
    unregisters; the mapping is unmapped after it, with the tensor's storage.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # anonymous: untouched pages cost nothing yet
    blocks = torch.frombuffer(mapping, dtype=dtype).view(shape)  # the storage holds the mapping
    cudart = _cudart()
    pointer = blocks.data_ptr()
    with torch.cuda.device(device):
        status = cudart.cudaHostRegister(pointer, nbytes, 0)  # 0: cudaHostRegisterDefault
    if int(status) != 0:
        raise RuntimeError(
            f"could not page-lock the host KV tier's {nbytes} bytes ({nbytes / 2**30:.2f} GiB): "
            f"CUDA error {int(status)} ({cudart.cudaGetErrorString(status)}); lower kv_offloading_size "
            "or free host memory"
        )
    unlock = weakref.finalize(blocks, _unregister, device, pointer)
    unlock.atexit = False  # at exit the process's pages go anyway; no device work while CUDA shuts down
    return blocks, unlock


def _unregister(device: torch.device, pointer: int) -> None:
    torch.cuda.synchronize(device)  # no queued copy may still read or write the pages
    _cudart().cudaHostUnregister(pointer)


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]  # torch leaves it unannotated


def _runs(sorted_values: list[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of positions whose values go up by one: [3, 4, 5, 9] -> [(0, 3), (3, 4)]."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(sorted_values) + 1):
        if i == len(sorted_values) or sorted_values[i] != sorted_values[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs
