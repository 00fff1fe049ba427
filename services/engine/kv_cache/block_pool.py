"""The pool of KV blocks: reference counts, the free queue in eviction order, the prefix-cache map.

Invariants:
  * block 0 is the padding block (CUDA-graph padding rows write there); it is never handed out.
  * a block is in the free queue iff its ref_cnt is 0. The queue's front is evicted first: blocks
    enter at the back when their last user frees them, so the least recently used goes first.
  * a cached block (block_hash set) stays findable by its hash while it sits in the free queue;
    allocating it for new content evicts it and emits BlockRemoved. An `on_evict` hook (the host
    tier, services/engine/kv_cache/host_tier.py) sees the block before its hash is cleared.

    free queue:  front [ evict first ... most recently freed ] back
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.common.block_hash import ExtraKey
from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

PADDING_BLOCK_ID = 0


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the block's tokens, re-checked on every cache hit
    parent_hash: int | None = None  # the chain's previous block, and the extra keys its hash covers: kept
    extra_keys: list[str] | None = None  # for the host tier's BlockStored when the block is evicted there


class BlockPool:
    def __init__(
        self, num_blocks: int, enable_caching: bool = True, on_evict: Callable[[KVBlock], None] | None = None
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is padding), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks if b.block_id != PADDING_BLOCK_ID
        )
        self._cached: dict[int, KVBlock] = {}  # block_hash -> block
        self._events: list[KVEvent] = []
        self._on_evict = on_evict  # called with a cached block about to lose its content

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of usable blocks referenced by a request (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block with this hash whose tokens really match, or None."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def is_cached(self, block_hash: int) -> bool:
        """A block with this hash is findable (its tokens not re-checked: see lookup)."""
        return block_hash in self._cached

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on blocks found in the cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks with {len(self._free)} free")
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the free queue in the given order."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(
        self,
        block: KVBlock,
        block_hash: int,
        parent_hash: int | None,
        token_ids: tuple[int, ...],
        extra_keys: tuple[ExtraKey, ...] = (),
    ) -> None:
        """Make a full block findable by its hash (first writer wins when two blocks hold the same content)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash, block.token_ids, block.parent_hash = block_hash, token_ids, parent_hash
        block.extra_keys = [str(k) for k in extra_keys] if extra_keys else None
        self._cached[block_hash] = block
        # one entry per block, as vLLM's
        keys: list[list[str] | None] | None = [block.extra_keys] if block.extra_keys else None
        self._events.append(BlockStored([block_hash], parent_hash, list(token_ids), len(token_ids), extra_keys=keys))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no request holds a block."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.blocks:
            _forget(block)
        self._cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def cached_hashes(self) -> list[int]:
        """Every block hash findable in the cache now (a snapshot for routers that fell behind)."""
        for _ in range(8):  # another thread may be resizing the map: retry the copy
            try:
                return list(self._cached)
            except RuntimeError:
                continue
        return []

    def record_event(self, event: KVEvent) -> None:
        """Append another tier's event to this pool's stream, so both tiers' events keep one order."""
        self._events.append(event)

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        del self._cached[block.block_hash]
        self._events.append(BlockRemoved([block.block_hash]))
        if self._on_evict is not None:
            self._on_evict(block)
        _forget(block)


def _forget(block: KVBlock) -> None:
    block.block_hash, block.token_ids, block.parent_hash, block.extra_keys = None, (), None, None
