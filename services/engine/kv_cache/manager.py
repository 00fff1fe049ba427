"""Per-request block tables over the block pool, with prefix caching.

A request's block table covers its computed tokens plus the tokens scheduled this step:

    tokens:  | computed (KV in cache)       | scheduled now     |
    blocks:  | b0 | b1 | b2 | b3 (partial) ...  | b4 (new)     |
             |<- cached full blocks ->|

Prefix caching: the leading full blocks of a new request are looked up by their chained hashes
(services.common.block_hash) and shared by reference; at least the last prompt token is always
computed, so the model yields logits to sample from. Full blocks are registered in the cache as
soon as they are scheduled: within one step every layer writes all new K/V before any attention
reads it, so a request scheduled later in the same step may already share them.

Freeing releases a request's blocks tail first, so under eviction pressure a prefix outlives its
continuations.

Host tier (EngineConfig.kv_offloading_size > 0; services/engine/kv_cache/host_tier.py): a cached block
the pool evicts is saved to host memory, and a new request's cached prefix goes on there after the
device's: those blocks are restored into fresh device blocks (counted in `host_hit_tokens`) instead of
recomputed. The copies are planned here and issued by whoever takes the plan (`take_copy_plan`: the
engine, before the forward of the step whose scheduling planned them).

Image requests: every block overlapping an image's placeholder tokens carries the image's content hash
in its extra keys (and, through the chain, so does every later block), so the same placeholder tokens
with another image never share KV, while the same image and text do.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.block_hash import block_extra_keys, hash_request_blocks
from services.engine.kv_cache.block_pool import BlockPool, KVBlock
from services.engine.kv_cache.host_tier import HostBlock, HostBlockPool, KVCopyPlan
from services.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_host_blocks: int = 0
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        with_host = enable_prefix_caching and num_host_blocks > 0
        self.pool = BlockPool(
            num_blocks, enable_caching=enable_prefix_caching, on_evict=self._offload if with_host else None
        )
        # the host tier (None: off); its events go into the device pool's stream, in order
        self.host = HostBlockPool(num_host_blocks, block_size, self.pool.record_event) if with_host else None
        self._plan = KVCopyPlan()  # copies planned since the last take_copy_plan
        self._pinned: list[HostBlock] = []  # host blocks the plan onloads from
        self.num_offloaded_blocks = 0  # blocks copied device -> host (in plans taken)
        self.num_onloaded_blocks = 0  # blocks copied host -> device (in plans taken)
        self.host_hit_tokens = 0  # prompt tokens restored from the host tier instead of recomputed
        self._blocks: dict[str, list[KVBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # mirrors _blocks, read by the runner every step
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already registered in the cache
        self.prefix_cache_queried_tokens = 0  # tokens looked up in the prefix cache (vllm:prefix_cache_queries)
        self.prefix_cache_hit_tokens = 0  # of which found (vllm:prefix_cache_hits)

    # --------------------------------------------------------------- queries

    def usage(self) -> float:
        return self.pool.usage()

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def host_cached_hashes(self) -> list[int]:
        """Every block hash the host tier holds now (none without one); safe from another thread."""
        return self.host.cached_hashes() if self.host is not None else []

    def block_ids(self, request_id: str) -> list[int]:
        return self._block_ids.get(request_id, [])

    def holds(self, request_id: str) -> bool:
        return request_id in self._blocks

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """Cached blocks covering the longest cached prefix of a request that holds no blocks yet."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(request, request.num_tokens)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        tokens = request.all_token_ids
        hits: list[KVBlock] = []
        for i, block_hash in enumerate(request.block_hashes[:max_hit_blocks]):
            block_tokens = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.lookup(block_hash, block_tokens)
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_queried_tokens += request.num_tokens
        self.prefix_cache_hit_tokens += len(hits) * self.block_size
        return hits

    def get_host_hits(self, request: Request, num_device_blocks: int) -> list[HostBlock]:
        """Host-tier blocks continuing a request's cached device prefix of `num_device_blocks` blocks (the
        chain goes on with the same hashes, tokens re-checked; the last prompt token is still computed)."""
        if self.host is None:
            return []
        self._update_hashes(request, request.num_tokens)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        tokens, bs = request.all_token_ids, self.block_size
        hits: list[HostBlock] = []
        for i in range(num_device_blocks, max_hit_blocks):
            block = self.host.lookup(request.block_hashes[i], tuple(tokens[i * bs : (i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
        return hits

    def num_cached_prefix_tokens(self, request: Request) -> int:
        """The tokens get_computed_blocks would find now, as a probe for ordering waiting requests.

        It adopts nothing, is not counted in the prefix-cache metrics, and matches block hashes alone,
        without re-checking their tokens (a collision can only misorder): one dict lookup per block once
        the request's hashes are computed (the first call computes them, as admission would)."""
        if not self.enable_prefix_caching:
            return 0
        self._update_hashes(request, request.num_tokens)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        num_hit_blocks = 0
        for block_hash in request.block_hashes[:max_hit_blocks]:
            if not self.pool.is_cached(block_hash):
                break
            num_hit_blocks += 1
        host = self.host
        if host is not None:  # the host tier's continuation, as get_host_hits finds it
            for block_hash in request.block_hashes[num_hit_blocks:max_hit_blocks]:
                if not host.contains(block_hash):
                    break
                num_hit_blocks += 1
        return num_hit_blocks * self.block_size

    # --------------------------------------------------------------- allocation

    def can_allocate(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[KVBlock] = (),
        host_blocks: Sequence[HostBlock] = (),
    ) -> bool:
        num_blocks = self._num_blocks_to_take(request, num_new_tokens, computed_blocks, len(host_blocks))
        return num_blocks <= self.pool.num_free_blocks

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[KVBlock] = (),
        host_blocks: Sequence[HostBlock] = (),
    ) -> bool:
        """Give the request room for `num_new_tokens` more tokens (after any computed_blocks it adopts and
        host_blocks restored after them: see get_host_hits).

            blocks:  | computed_blocks (shared) | host_blocks (fresh, onload planned) | fresh for new tokens |

        Returns False, changing nothing, when the pool cannot supply enough blocks.
        """
        if not self.can_allocate(request, num_new_tokens, computed_blocks, host_blocks):
            return False
        blocks = self._blocks.setdefault(request.request_id, [])
        ids = self._block_ids.setdefault(request.request_id, [])
        if computed_blocks or host_blocks:
            assert not blocks, "cached blocks are adopted only by a request holding none"
            self.pool.touch(computed_blocks)
            self._append(blocks, ids, computed_blocks)
            self._num_cached_blocks[request.request_id] = len(computed_blocks)
        if host_blocks:  # pinned before allocating: the evictions below may save blocks to the host tier
            self._pin(host_blocks)
        num_prefix_blocks = len(computed_blocks) + len(host_blocks)
        num_tokens_after = request.num_computed_tokens + num_prefix_blocks * self.block_size + num_new_tokens
        num_missing = cdiv(num_tokens_after, self.block_size) - len(blocks)
        if num_missing > 0:
            self._append(blocks, ids, self.pool.allocate(num_missing))
        for host_block, block in zip(host_blocks, blocks[len(computed_blocks) : num_prefix_blocks]):
            self._plan.onloads.append((host_block.slot, block.block_id))
        self.host_hit_tokens += len(host_blocks) * self.block_size
        # a pending token (asynchronous scheduling) is not known yet: its block is cached once it is
        self._cache_full_blocks(request, min(num_tokens_after, request.num_tokens))
        return True

    def allocate_for_import(self, request: Request, num_tokens: int) -> list[int] | None:
        """Fresh blocks for KV computed elsewhere (disaggregated prefill); None when there is no room."""
        assert request.request_id not in self._blocks
        if cdiv(num_tokens, self.block_size) > self.pool.num_free_blocks:
            return None
        blocks = self.pool.allocate(cdiv(num_tokens, self.block_size))
        self._blocks[request.request_id] = blocks
        self._block_ids[request.request_id] = [b.block_id for b in blocks]
        return self.block_ids(request.request_id)

    def take_copy_plan(self) -> KVCopyPlan:
        """The copies between tiers planned since the last call, to be issued before the device cache is
        next written or read (services/engine/kv_cache/host_tier.py, "Ordering"); the host blocks they
        read become evictable again."""
        plan, self._plan = self._plan, KVCopyPlan()
        if self.host is not None:
            self.host.unpin(self._pinned)
        self._pinned = []
        self.num_offloaded_blocks += len(plan.offloads)
        self.num_onloaded_blocks += len(plan.onloads)
        return plan

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block of both tiers; only possible when no request holds a block."""
        if not self.pool.reset_prefix_cache():
            return False
        if self.host is not None:
            self.host.clear()
        return True

    def commit_imported(self, request: Request, num_tokens: int) -> None:
        """Imported KV is in place: its full blocks may now be shared."""
        self._cache_full_blocks(request, num_tokens)

    def free(self, request_id: str) -> None:
        blocks = self._blocks.pop(request_id, None)
        self._block_ids.pop(request_id, None)
        self._num_cached_blocks.pop(request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    # --------------------------------------------------------------- internals

    @staticmethod
    def _append(blocks: list[KVBlock], ids: list[int], new_blocks: Sequence[KVBlock]) -> None:
        blocks.extend(new_blocks)
        ids.extend(b.block_id for b in new_blocks)

    def _num_blocks_to_take(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[KVBlock], num_host_blocks: int = 0
    ) -> int:
        held = len(self._blocks.get(request.request_id, ())) + len(computed_blocks)
        num_prefix_blocks = len(computed_blocks) + num_host_blocks  # restored host blocks take fresh ones
        num_tokens_after = request.num_computed_tokens + num_prefix_blocks * self.block_size + num_new_tokens
        num_new_blocks = max(0, cdiv(num_tokens_after, self.block_size) - held)
        # adopting a cached block that sits in the free queue removes it from there
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        return num_new_blocks + num_revived

    def _pin(self, host_blocks: Sequence[HostBlock]) -> None:
        assert self.host is not None
        self.host.pin(host_blocks)
        self._pinned.extend(host_blocks)

    def _offload(self, block: KVBlock) -> None:
        """The pool evicts a cached block: save its KV to the host tier (unless it holds the hash already)."""
        assert self.host is not None and block.block_hash is not None
        slot = self.host.store(block.block_hash, block.parent_hash, block.token_ids, block.extra_keys)
        if slot is not None:
            self._plan.offloads[slot] = block.block_id

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        if len(request.block_hashes) < num_tokens // self.block_size:
            request.block_hashes = hash_request_blocks(
                request.all_token_ids[:num_tokens],
                self.block_size,
                request.cache_salt,
                request.mm_spans,
                known_hashes=request.block_hashes,
            )

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request, num_full * self.block_size)
        blocks, tokens, bs = self._blocks[request.request_id], request.all_token_ids, self.block_size
        for i in range(start, num_full):
            parent = request.block_hashes[i - 1] if i > 0 else None
            self.pool.cache_block(
                blocks[i],
                request.block_hashes[i],
                parent,
                tuple(tokens[i * bs : (i + 1) * bs]),
                block_extra_keys(i, bs, request.cache_salt, request.mm_spans),
            )
        self._num_cached_blocks[request.request_id] = num_full
