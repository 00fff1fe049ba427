"""The router's prefix and embedding indexes: exact matches, holes, gaps, replays, removal."""

import random

from services.common.block_hash import ROOT_PARENT_HASH, hash_request_blocks
from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from services.engine.kv_cache.manager import KVCacheManager
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.router.events import AllEmbeddingsCleared, EmbeddingRemoved, EmbeddingStored
from services.router.index import FIRST_EVENT_SEQ, ContentIndex, PrefixIndex

BLOCK = 4


def chain(tokens, salt=None):
    return hash_request_blocks(list(tokens), BLOCK, salt)


def stored(hashes, parent=None):
    """One BlockStored per block, as the engine's block pool emits them."""
    events = []
    for block_hash in hashes:
        events.append(BlockStored([block_hash], parent, [0] * BLOCK, BLOCK))
        parent = block_hash
    return events


def test_match_is_the_longest_fully_held_prefix_per_worker():
    index = PrefixIndex()
    a = chain(range(24))  # 6 blocks
    b = chain(list(range(8)) + [99] * 16)  # shares blocks 0, 1 with a
    assert index.apply("w0", 0, stored(a))
    assert index.apply("w1", 0, stored(b[:4]))
    assert index.match(a) == {"w0": 6, "w1": 2}
    assert index.match(b) == {"w0": 2, "w1": 4}
    assert index.match(a[:3]) == {"w0": 3, "w1": 2}
    assert index.match(chain(range(100, 124))) == {}
    assert index.match([]) == {}
    assert index.holders(a[0]) == ["w0", "w1"] and index.holders(a[5]) == ["w0"]


def test_eviction_in_the_middle_of_a_chain_stops_the_match_at_the_hole():
    index = PrefixIndex()
    a = chain(range(24))
    index.apply("w0", 0, stored(a))
    index.apply("w0", 1, [BlockRemoved([a[2]])])
    assert index.match(a) == {"w0": 2}
    assert index.blocks("w0") == frozenset(a) - {a[2]}  # later blocks stay stored: the worker holds them
    index.apply("w0", 2, stored([a[2]], parent=a[1]))  # recomputed: the chain is whole again
    assert index.match(a) == {"w0": 6}
    index.apply("w0", 3, [BlockRemoved([a[0]])])
    assert index.match(a) == {}
    assert index.num_keys("w0") == 5


def test_a_gap_is_refused_unapplied_and_a_replay_restores_the_exact_state():
    index = PrefixIndex()
    a, b = chain(range(16)), chain(range(50, 66))
    assert index.apply("w0", 0, stored(a))
    assert not index.apply("w0", 2, [BlockRemoved([a[0]])])  # batch 1 was lost
    assert index.match(a) == {"w0": 4} and index.expected_seq("w0") == 1
    # the worker's state after batches 1 (store b) and 2 (remove a[0]), replayed as of batch 2
    index.replace_worker("w0", 2, [(h, p) for h, p in zip(a[1:] + b, [a[0], a[1], a[2], ROOT_PARENT_HASH, *b[:3]])])
    reference = PrefixIndex()
    reference.apply("w0", 0, stored(a))
    reference.apply("w0", 1, stored(b))
    reference.apply("w0", 2, [BlockRemoved([a[0]])])
    assert index.blocks("w0") == reference.blocks("w0")
    assert index.match(a) == reference.match(a) == {}
    assert index.match(b) == reference.match(b) == {"w0": 4}
    assert index.expected_seq("w0") == 3
    assert not index.apply("w0", 2, [])  # a repeat is refused too
    assert index.apply("w0", 3, [])


def test_a_replay_is_exact_for_a_worker_whose_cache_changed_entirely():
    index = PrefixIndex()
    a, b = chain(range(16)), chain(range(50, 66))
    index.apply("w0", 0, stored(a))
    index.apply("w1", 0, stored(a))
    index.replace_worker("w0", 7, [(h, None) for h in b[:2]])
    assert index.match(a) == {"w1": 4}
    assert index.match(b) == {"w0": 2}
    assert len(index) == 6
    index.replace_worker("w0", 8, [])
    assert index.blocks("w0") == frozenset() and index.match(b) == {}


def test_an_unknown_worker_must_start_at_the_first_batch():
    index = PrefixIndex()
    a = chain(range(8))
    assert index.expected_seq("w9") == FIRST_EVENT_SEQ == 0
    assert not index.apply("w9", 5, stored(a))  # the index missed its start: replay needed
    assert index.match(a) == {} and index.workers() == []
    assert index.apply("w9", 0, [])
    assert index.workers() == ["w9"]


def test_all_blocks_cleared_forgets_only_that_worker():
    index = PrefixIndex()
    a = chain(range(16))
    index.apply("w0", 0, stored(a))
    index.apply("w1", 0, stored(a[:2]))
    index.apply("w0", 1, [AllBlocksCleared(), *stored(a[:1])])  # events apply in order within a batch
    assert index.match(a) == {"w0": 1, "w1": 2}
    assert index.num_keys("w0") == 1


def test_remove_worker_forgets_it_and_its_slot_is_reused_cleanly():
    index = PrefixIndex()
    a = chain(range(16))
    index.apply("w0", 0, stored(a))
    index.apply("w1", 0, stored(a[:3]))
    index.remove_worker("w0")
    assert index.match(a) == {"w1": 3}
    assert index.expected_seq("w0") == 0 and index.workers() == ["w1"]
    index.apply("w2", 0, stored(a[:1]))  # takes w0's old slot
    assert index.match(a) == {"w1": 3, "w2": 1}
    index.remove_worker("w1")
    index.remove_worker("w2")
    assert len(index) == 0


def test_match_agrees_with_a_plain_reference_under_random_events():
    rng = random.Random(0)
    prefixes = [chain([p] * 8 + list(range(32))) for p in range(6)]  # 6 chains of 10 blocks
    index = PrefixIndex()
    held = {f"w{i}": set() for i in range(5)}
    seq = dict.fromkeys(held, 0)
    for _ in range(400):
        worker = rng.choice(list(held))
        event = rng.random()
        if event < 0.6:
            hashes = rng.choice(prefixes)[: rng.randint(1, 10)]
            events = stored(hashes)
            held[worker] |= set(hashes)
        elif event < 0.97:
            gone = rng.sample(sorted(held[worker]), min(2, len(held[worker])))
            events = [BlockRemoved(gone)]
            held[worker] -= set(gone)
        else:
            events = [AllBlocksCleared()]
            held[worker] = set()
        assert index.apply(worker, seq[worker], events)
        seq[worker] += 1
        request = rng.choice(prefixes)
        expected = {}
        for w, blocks in held.items():
            n = 0
            while n < len(request) and request[n] in blocks:
                n += 1
            if n:
                expected[w] = n
        assert index.match(request) == expected
    for w, blocks in held.items():
        assert index.blocks(w) == frozenset(blocks)


def test_the_engine_kv_cache_events_make_the_index_predict_its_hits():
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK)  # 5 usable
    index = PrefixIndex()
    seq = 0

    def sync():
        nonlocal seq
        assert index.apply("w0", seq, kv.pool.take_events())
        seq += 1

    def request(request_id, tokens):
        return Request(request_id, list(tokens), SamplingParams(max_tokens=4), eos_token_id=None, max_output_tokens=4)

    a = request("a", range(13))  # 3 full blocks
    kv.allocate_slots(a, 13)
    kv.free("a")
    sync()
    probe = list(range(12)) + [77, 78, 79]
    assert index.match(chain(probe)) == {"w0": 3} == {"w0": len(kv.get_computed_blocks(request("p", probe)))}
    b = request("b", range(100, 116))  # 4 blocks: evicts from the free queue front, cached a-blocks included
    kv.allocate_slots(b, 16)
    sync()
    # freed tail first, so a's blocks 2 and 1 were evicted and block 0 survives
    assert index.match(chain(probe)) == {"w0": 1} == {"w0": len(kv.get_computed_blocks(request("p2", probe)))}


def test_content_index_follows_events_gaps_and_replays():
    index = ContentIndex()
    assert index.apply("e0", 0, [EmbeddingStored(["img-a", "img-b"])])
    assert index.apply("e1", 0, [EmbeddingStored(["img-b"])])
    assert index.match(["img-a", "img-b", "img-c"]) == {"e0": 2, "e1": 1}
    assert index.holders("img-b") == ["e0", "e1"]
    assert index.apply("e0", 1, [EmbeddingRemoved(["img-b"])])
    assert index.holders("img-b") == ["e1"]
    assert not index.apply("e0", 3, [AllEmbeddingsCleared()])  # gap: unapplied
    assert index.contents("e0") == frozenset({"img-a"})
    index.replace_worker("e0", 3, ["img-c"])
    assert index.match(["img-a", "img-c"]) == {"e0": 1}
    assert index.apply("e0", 4, [AllEmbeddingsCleared()])
    assert index.contents("e0") == frozenset()
    index.remove_worker("e1")
    assert index.holders("img-b") == [] and len(index) == 0


# ---------------------------------------------------------------------------------------------- pending claims


class SettableClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_claim_counts_in_match_only_and_a_retry_replaces_it():
    index = PrefixIndex(pending_block_ttl_s=10.0, clock=SettableClock())
    a = chain(range(24))
    index.apply("w0", 0, stored(a[:2]))
    index.add_pending("r1", "w0", a)
    assert index.blocks("w0") == frozenset(a[:2]) and index.pending_blocks("w0") == dict.fromkeys(a, 1)
    assert index.match(a) == {"w0": 6}
    assert index.holders(a[3]) == [] and len(index) == 2  # holders and len count held blocks only
    index.add_pending("r1", "w1", a[:3])  # placed again (a retry): the earlier claims go
    assert index.pending_blocks("w0") == {} and index.pending_blocks("w1") == dict.fromkeys(a[:3], 1)
    assert index.match(a) == {"w0": 2, "w1": 3} and index.num_pending_placements() == 1
    assert index.workers() == ["w0"]  # a claim alone does not make an event stream
    index.apply("w0", 1, [BlockRemoved([a[0]])])  # w1's claim is not w0's block
    assert index.match(a) == {"w1": 3}


def test_the_eviction_of_a_held_block_ends_the_claims_on_it():
    index = PrefixIndex(pending_block_ttl_s=10.0, clock=SettableClock())
    a = chain(range(16))
    index.apply("w0", 0, stored(a))
    index.add_pending("r1", "w0", a)  # r1 hits all four blocks: nothing of it will be stored
    index.apply("w0", 1, [BlockRemoved([a[1]])])
    assert index.pending_blocks("w0") == {a[0]: 1, a[2]: 1, a[3]: 1} and index.match(a) == {"w0": 1}
    index.apply("w0", 2, [AllBlocksCleared()])
    assert index.pending_blocks("w0") == {} and index.match(a) == {}
    assert index.num_pending_placements() == 1  # until its TTL or release, with nothing left to end


def test_a_placement_ends_only_the_claims_of_its_own_run():
    index = PrefixIndex(pending_block_ttl_s=10.0, clock=SettableClock())
    a = chain(range(8))
    index.add_pending("r1", "w0", a)
    index.apply("w0", 0, stored(a))  # confirmed: the run of claims r1 opened ends
    index.apply("w0", 1, [BlockRemoved(a)])  # evicted
    assert index.match(a) == {}
    index.add_pending("r2", "w0", a)  # a new run
    index.release_pending("r1")  # must not end r2's claims
    assert index.pending_blocks("w0") == dict.fromkeys(a, 1) and index.match(a) == {"w0": 2}
    index.release_pending("r2")
    assert index.match(a) == {} and len(index) == 0


def test_a_zero_ttl_records_no_claims():
    index = PrefixIndex(pending_block_ttl_s=0.0)
    index.add_pending("r1", "w0", chain(range(8)))
    assert index.match(chain(range(8))) == {} and index.num_pending_placements() == 0


def test_claims_and_events_agree_with_a_plain_reference():
    """match and pending_blocks against a reference that keeps every claim and replays the rules.

    A claim of placement p on (w, h) is open iff p is live (released? expired?) and nothing settled
    (w, h) since p was made: a store of h on w, a removal or clear of h while w held it, a replay
    or removal of w."""
    rng = random.Random(1)
    clock = SettableClock()
    ttl_s = 10.0
    index = PrefixIndex(pending_block_ttl_s=ttl_s, clock=clock)
    prefixes = [chain([p] * 8 + list(range(32))) for p in range(4)]  # 4 chains of 10 blocks
    workers = ["w0", "w1", "w2"]
    held = {w: set() for w in workers}
    reset_at = {}  # (worker, hash) -> step of the last confirmation, replay or removal
    worker_reset_at = dict.fromkeys(workers, -1)
    claims = {}  # request id -> (worker, claimed hashes, step, placed_at)
    seq = dict.fromkeys(workers, 0)
    for step in range(600):
        worker = rng.choice(workers)
        op = rng.random()
        if op < 0.35:
            request_id = f"r{rng.randrange(40)}"
            hashes = rng.choice(prefixes)[: rng.randint(1, 10)]
            index.add_pending(request_id, worker, hashes)
            claims[request_id] = (worker, list(hashes), step, clock.now)
        elif op < 0.45:
            request_id = f"r{rng.randrange(40)}"
            index.release_pending(request_id)
            claims.pop(request_id, None)
        elif op < 0.65:
            hashes = rng.choice(prefixes)[: rng.randint(1, 10)]
            assert index.apply(worker, seq[worker], stored(hashes))
            seq[worker] += 1
            held[worker] |= set(hashes)
            reset_at.update({(worker, h): step for h in hashes})
        elif op < 0.85:
            gone = rng.sample(sorted(held[worker] | {prefixes[0][3], prefixes[1][5]}), 2)  # maybe only claimed
            assert index.apply(worker, seq[worker], [BlockRemoved(gone)])
            seq[worker] += 1
            reset_at.update({(worker, h): step for h in gone if h in held[worker]})
            held[worker] -= set(gone)
        elif op < 0.9:
            assert index.apply(worker, seq[worker], [AllBlocksCleared()])
            seq[worker] += 1
            reset_at.update({(worker, h): step for h in held[worker]})
            held[worker] = set()
        elif op < 0.95:
            keep = set(rng.sample(sorted(held[worker]), len(held[worker]) // 2))
            seq[worker] += 3
            index.replace_worker(worker, seq[worker] - 1, [(h, None) for h in keep])
            held[worker] = keep
            worker_reset_at[worker] = step
        else:
            clock.now += rng.choice([0.5, 3.0])
        claims = {r: c for r, c in claims.items() if c[3] >= clock.now - ttl_s}
        pending = {w: {} for w in workers}
        for claim_worker, claimed, claim_step, _ in claims.values():
            for h in claimed:
                if claim_step > max(reset_at.get((claim_worker, h), -1), worker_reset_at[claim_worker]):
                    pending[claim_worker][h] = pending[claim_worker].get(h, 0) + 1
        for w in workers:
            assert index.pending_blocks(w) == pending[w], (step, w)
            assert index.blocks(w) == frozenset(held[w])
        request = rng.choice(prefixes)
        expected = {}
        for w in workers:
            n = 0
            while n < len(request) and (request[n] in held[w] or request[n] in pending[w]):
                n += 1
            if n:
                expected[w] = n
        assert index.match(request) == expected, step
    clock.now += ttl_s + 1
    assert all(index.pending_blocks(w) == {} for w in workers) and index.num_pending_placements() == 0


# ---------------------------------------------------------------------------------------------- host tier


def host_stored(hashes):
    """The host tier's BlockStored: blocks entering host memory."""
    return [BlockStored(list(hashes), None, [0] * (BLOCK * len(hashes)), BLOCK, medium="CPU")]


def host_removed(hashes):
    return [BlockRemoved(list(hashes), medium="CPU")]


def test_host_tier_blocks_are_tracked_apart_from_device_blocks():
    index = PrefixIndex()
    a = chain(range(16))
    assert index.apply("w0", 0, host_stored(a))
    assert index.host_blocks("w0") == frozenset(a) and index.num_host_keys("w0") == 4
    assert index.blocks("w0") == frozenset() and index.num_keys("w0") == 0 and len(index) == 0
    assert index.match(a) == {}  # a host-only holder is no device hit
    assert index.holds("w0", a[0]) is False and index.holders(a[0]) == [] and index.host_holders(a[0]) == ["w0"]
    assert index.match_tiers(a) == ({}, {"w0": 4})
    assert index.workers() == ["w0"] and index.expected_seq("w0") == 1  # one sequence for both tiers


def test_match_tiers_continues_a_device_prefix_through_the_host_tier():
    index = PrefixIndex()
    a = chain(range(24))  # 6 blocks
    index.apply("w0", 0, stored(a[:2]) + host_stored(a[2:4]))  # device 2, host 2 more
    index.apply("w1", 0, stored(a[:3]) + host_stored(a[1:5]))  # on both tiers: blocks 1 and 2
    index.apply("w2", 0, stored(a[:1]) + host_stored(a[2:6]))  # host from block 2: the hole at 1
    index.apply("w3", 0, stored(a))
    device, host = index.match_tiers(a)
    assert device == index.match(a) == {"w0": 2, "w1": 3, "w2": 1, "w3": 6}
    assert host == {"w0": 2, "w1": 2}
    assert index.match_tiers(a[:3]) == (
        {"w0": 2, "w1": 3, "w2": 1, "w3": 3},
        {"w0": 1},
    )
    assert index.match_tiers([]) == ({}, {})


def test_the_two_tiers_evict_apart_and_a_host_event_settles_no_claim():
    index = PrefixIndex(pending_block_ttl_s=10.0, clock=SettableClock())
    a = chain(range(16))
    index.apply("w0", 0, stored(a[:2]) + host_stored(a[1:4]))
    index.apply("w0", 1, [BlockRemoved([a[1]])])  # the device copy of block 1 goes; its host copy stays
    assert index.match_tiers(a) == ({"w0": 1}, {"w0": 3})
    index.apply("w0", 2, host_removed([a[2]]))  # the host copy of block 2 goes: the chain stops there
    assert index.match_tiers(a) == ({"w0": 1}, {"w0": 1})
    assert index.blocks("w0") == {a[0]} and index.host_blocks("w0") == {a[1], a[3]}
    index.add_pending("r1", "w1", a)
    index.apply("w1", 0, host_stored(a))  # a claim predicts device blocks: the host tier's events leave it open
    assert index.pending_blocks("w1") == dict.fromkeys(a, 1)
    assert index.match_tiers(a) == ({"w0": 1, "w1": 4}, {"w0": 1})


def test_gpu_is_the_device_medium_and_other_media_are_ignored():
    index = PrefixIndex()
    a = chain(range(12))
    index.apply("w0", 0, [BlockStored(a, None, [0] * 12, BLOCK, medium="GPU")])
    index.apply("w1", 0, [BlockStored(a, None, [0] * 12, BLOCK, medium="DISK")])
    assert index.match_tiers(a) == ({"w0": 3}, {})
    index.apply("w0", 1, [BlockRemoved(a[2:], medium="GPU")])
    assert index.match(a) == {"w0": 2}


def test_all_blocks_cleared_remove_worker_and_a_replay_clear_the_host_tier():
    index = PrefixIndex()
    a, b = chain(range(16)), chain(range(50, 66))
    for worker in ("w0", "w1", "w2"):
        assert index.apply(worker, 0, stored(a[:1]) + host_stored(a[1:]))
    index.apply("w0", 1, [AllBlocksCleared()])
    assert index.blocks("w0") == frozenset() and index.host_blocks("w0") == frozenset()
    index.remove_worker("w1")
    assert index.host_blocks("w1") == frozenset() and index.host_holders(a[1]) == ["w2"]
    index.replace_worker("w2", 5, [(b[0], None)])  # a replay without host blocks: the host tier is empty
    assert index.host_blocks("w2") == frozenset() and index.host_holders(a[1]) == []
    assert index.match_tiers(a) == ({}, {}) and index.expected_seq("w2") == 6
    index.replace_worker("w2", 6, [(b[0], None)], host_block_hashes=b[1:3])
    assert index.match_tiers(b) == ({"w2": 1}, {"w2": 2})
    index.apply("w3", 0, host_stored(a))  # w3 takes w1's freed slot: nothing of w1's host blocks comes with it
    assert index.match_tiers(a) == ({}, {"w3": 4})


def test_match_tiers_agrees_with_a_plain_reference_under_random_events():
    """The bitmask walk against sets per worker: device prefix d, then the host blocks that follow it."""
    rng = random.Random(7)
    index = PrefixIndex()
    prefixes = [chain([p] * 4 + list(range(28))) for p in range(3)]  # 3 chains of 8 blocks
    workers = [f"w{i}" for i in range(5)]
    device = {w: set() for w in workers}
    host = {w: set() for w in workers}
    seq = dict.fromkeys(workers, 0)
    for step in range(800):
        worker = rng.choice(workers)
        hashes = rng.choice(prefixes)
        some = rng.sample(hashes, rng.randint(1, 4))
        op = rng.random()
        if op < 0.3:
            events = stored(some)
            device[worker].update(some)
        elif op < 0.6:
            events = host_stored(some)
            host[worker].update(some)
        elif op < 0.75:
            events = [BlockRemoved(some)]
            device[worker].difference_update(some)
        elif op < 0.9:
            events = host_removed(some)
            host[worker].difference_update(some)
        elif op < 0.95:
            events = [AllBlocksCleared()]
            device[worker].clear()
            host[worker].clear()
        else:
            index.remove_worker(worker)
            device[worker].clear()
            host[worker].clear()
            seq[worker] = 0
            continue
        assert index.apply(worker, seq[worker], events)
        seq[worker] += 1
        query = rng.choice(prefixes)[: rng.randint(1, 8)]
        expected_device, expected_host = {}, {}
        for w in workers:
            d = 0
            while d < len(query) and query[d] in device[w]:
                d += 1
            h = 0
            while d + h < len(query) and query[d + h] in host[w]:
                h += 1
            if d:
                expected_device[w] = d
            if h:
                expected_host[w] = h
        assert index.match_tiers(query) == (expected_device, expected_host), step
        assert index.match(query) == expected_device
