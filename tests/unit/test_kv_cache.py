"""The block pool and the KV cache manager on a ten-block cache: exact block ids, exact order."""

from services.common.block_hash import hash_request_blocks
from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from services.engine.kv_cache.block_pool import BlockPool
from services.engine.kv_cache.manager import KVCacheManager
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams

BLOCK = 4


def make_request(request_id, token_ids, salt=None):
    return Request(
        request_id,
        list(token_ids),
        SamplingParams(max_tokens=8),
        eos_token_id=None,
        max_output_tokens=8,
        cache_salt=salt,
    )


def test_pool_hands_out_blocks_in_order_and_never_the_padding_block():
    pool = BlockPool(10)
    assert [b.block_id for b in pool.allocate(3)] == [1, 2, 3]
    assert pool.num_free_blocks == 6


def test_freed_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(6)
    a, _b, c = pool.allocate(3)  # 1, 2, 3
    pool.free([c, a])  # tail first, as the manager frees
    rest = pool.allocate(4)  # 4, 5 are untouched, then 3, then 1
    assert [blk.block_id for blk in rest] == [4, 5, 3, 1]


def test_manager_allocates_exact_block_tables_and_frees_tail_first():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    req = make_request("a", range(10))  # 10 tokens: 3 blocks
    assert kv.allocate_slots(req, 10)
    assert kv.block_ids("a") == [1, 2, 3]
    for step in range(3):  # decode: tokens 11 and 12 still fit 3 blocks, token 13 takes a fourth
        req.num_computed_tokens = req.num_tokens
        req.output_token_ids.append(100 + step)
        assert kv.allocate_slots(req, 1)
        assert kv.block_ids("a") == ([1, 2, 3] if step < 2 else [1, 2, 3, 4])
    kv.free("a")
    assert kv.num_free_blocks() == 9
    assert [b.block_id for b in kv.pool.allocate(9)] == [5, 6, 7, 8, 9, 4, 3, 2, 1]


def test_allocation_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)  # 3 usable
    req = make_request("a", range(20))
    assert not kv.allocate_slots(req, 20)
    assert kv.num_free_blocks() == 3 and kv.block_ids("a") == []


def test_prefix_hit_shares_blocks_and_rechecks_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    a = make_request("a", range(10))
    kv.allocate_slots(a, 10)  # blocks 1, 2 full and cached; 3 partial
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == [1, 2]
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_ids("b") == [1, 2, 4]
    assert [kv.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    # a forged hash entry whose tokens differ is not a hit
    c = make_request("c", [7, 7, 7, 7, 1])
    c.block_hashes = [kv.pool.blocks[1].block_hash]
    assert kv.get_computed_blocks(c) == []


def test_whole_prompt_cached_still_leaves_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    a = make_request("a", range(8))
    kv.allocate_slots(a, 8)
    kv.free("a")
    again = make_request("a2", range(8))
    assert [blk.block_id for blk in kv.get_computed_blocks(again)] == [1]  # not [1, 2]: token 7 is recomputed


def test_cached_free_blocks_revive_on_hit_and_are_evicted_with_an_event():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)  # 3 usable
    a = make_request("a", range(9))
    kv.allocate_slots(a, 9)  # 1, 2 cached, 3 partial
    kv.free("a")
    events = kv.pool.take_events()
    hashes = hash_request_blocks(list(range(9)), BLOCK)
    assert events == [
        BlockStored([hashes[0]], None, [0, 1, 2, 3], BLOCK),
        BlockStored([hashes[1]], hashes[0], [4, 5, 6, 7], BLOCK),
    ]
    b = make_request("b", list(range(4)) + [50, 51, 52, 53, 54])
    hits = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == [1]
    assert kv.allocate_slots(b, 5, hits)  # revives 1, takes 3 then evicts cached 2
    assert kv.block_ids("b") == [1, 3, 2]
    assert BlockRemoved([hashes[1]]) in kv.pool.take_events()


def test_cache_salt_keeps_tenants_apart():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    kv.allocate_slots(make_request("a", range(9), salt="tenant-1"), 9)
    assert kv.get_computed_blocks(make_request("b", range(9), salt="tenant-2")) == []
    assert len(kv.get_computed_blocks(make_request("c", range(9), salt="tenant-1"))) == 2


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    kv.allocate_slots(make_request("a", range(8)), 8)
    assert not kv.pool.reset_prefix_cache()
    kv.free("a")
    assert kv.pool.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", range(9))) == []
    assert isinstance(kv.pool.take_events()[-1], AllBlocksCleared)
