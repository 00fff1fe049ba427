"""The worker's KV event log stays bounded by what its batches hold, not only by their number, and a
reader whose batches were dropped gets a snapshot of both tiers, which the router installs whole."""

from __future__ import annotations

import msgspec

from services.common.block_hash import hash_request_blocks
from services.common.control import KVEventReplay, KVEventSnapshot, KVEventsReply
from services.common.kv_events import BlockRemoved, BlockStored
from services.engine import LLM
from services.gateway.worker_state import KVEventFeed
from services.router import PrefixIndex
from services.workers.event_log import KVEventLog
from tests.unit.test_engine_vs_transformers import engine_greedy, random_prompts


def _stored(first_hash: int, num_tokens: int) -> BlockStored:
    return BlockStored(
        block_hashes=[first_hash], parent_block_hash=None, token_ids=list(range(num_tokens)), block_size=num_tokens
    )


def test_long_prompts_events_are_dropped_by_entries_before_the_batch_bound():
    log = KVEventLog(lambda: [1, 2, 3], max_batches=4096, max_entries=1000)
    for i in range(100):
        log.append([_stored(i, 99)])  # 100 entries a batch: the log holds 10
    assert log.num_entries == 1000
    assert log.next_seq == 100
    first, batches = log.batches_from(0)
    assert (first, len(batches)) == (90, 10)
    assert isinstance(log.read(95), KVEventReplay) and len(log.read(95).batches) == 5
    snapshot = log.read(50)  # dropped: the reader starts again from a snapshot
    assert isinstance(snapshot, KVEventSnapshot) and snapshot.seq == 99 and snapshot.block_hashes == [1, 2, 3]


def test_the_batch_bound_still_holds_for_small_batches_and_a_huge_batch_is_kept_alone():
    log = KVEventLog(list, max_batches=8, max_entries=1000)
    for i in range(20):
        log.append([BlockRemoved(block_hashes=[i])])
    assert log.batches_from(0)[0] == 12 and log.num_entries == 8
    log.append([_stored(99, 5000)])  # larger than the whole bound: the newest batch always stays
    first, batches = log.batches_from(0)
    assert (first, len(batches), log.num_entries) == (20, 1, 5001)


def test_a_snapshot_lists_the_host_tiers_blocks_and_the_router_matches_them_as_host_blocks(llama_dir):
    """A router that fell behind keeps knowing which blocks the worker holds in host memory."""
    # 7 usable device blocks of 8 tokens; 1 MiB of host tier: hundreds of the tiny model's blocks
    llm = LLM(llama_dir, block_size=8, num_kv_blocks=8, max_num_batched_tokens=64, kv_offloading_size=2**-10)
    kv_cache = llm.engine.kv_cache
    log = KVEventLog(kv_cache.pool.cached_hashes, host_snapshot=kv_cache.host_cached_hashes)
    first, second = random_prompts([40, 48], seed=21)
    engine_greedy(llm, [first], max_tokens=4)
    engine_greedy(llm, [second], max_tokens=4)  # its 7 blocks evict every block of the first prompt
    log.append(kv_cache.pool.take_events())
    first_hashes, second_hashes = hash_request_blocks(first, 8), hash_request_blocks(second, 8)

    reply = msgspec.msgpack.decode(msgspec.msgpack.encode(log.read(None)), type=KVEventsReply)
    assert isinstance(reply, KVEventSnapshot) and reply.seq == 0
    assert sorted(reply.host_block_hashes) == sorted(first_hashes)  # its 5 full blocks, now on the host
    assert sorted(reply.block_hashes) == sorted(second_hashes)

    index = PrefixIndex()
    feed = KVEventFeed("w0", index)
    _, token = feed.start_replay()
    feed.on_reply(reply, token)
    assert index.match_tiers(first_hashes) == ({}, {"w0": 5})
    assert index.match_tiers(second_hashes) == ({"w0": 6}, {})
    assert feed.next_seq == 1


def test_without_a_host_tier_the_snapshot_lists_no_host_blocks():
    assert KVEventLog(lambda: [1, 2]).read(None) == KVEventSnapshot(seq=-1, block_hashes=[1, 2], host_block_hashes=[])
