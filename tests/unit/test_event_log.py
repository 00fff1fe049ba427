"""The worker's KV event log stays bounded by what its batches hold, not only by their number, and a
reader whose batches were dropped gets a snapshot."""

from __future__ import annotations

from services.common.control import KVEventReplay, KVEventSnapshot
from services.common.kv_events import BlockRemoved, BlockStored
from services.workers.event_log import KVEventLog


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
