"""Placements recorded at once: pending block claims keep a burst together, reconcile with events, and
come from other gateways' routers too."""

import pytest

from services.common.block_hash import hash_request_blocks
from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from services.router import Router, RouterConfig, RouteRequest, WorkerLoad
from tests.unit.router_fixtures import Clock, tokens

BLOCK = 16
PREFIX_TOKENS = 512  # 32 blocks
SUFFIX_TOKENS = 32  # 2 blocks: 34 full blocks, at most 33 hit


def prompt(family, i):
    """A family's 512-token prefix plus a 32-token suffix of request i's own."""
    return tokens(PREFIX_TOKENS, family) + [900_000 + 1000 * family + 100 * i + j for j in range(SUFFIX_TOKENS)]


def blocks_of(token_ids):
    return hash_request_blocks(token_ids, BLOCK)


def make_router(policy, num_prefill=2, colocated=False, clock=None, **config):
    prefill = [f"p{i}" for i in range(num_prefill)]
    decode = prefill if colocated else ["d0", "d1"]
    return Router(prefill, list(decode), policy, BLOCK, RouterConfig(**config), clock=clock or Clock())


def place(router, request_id, token_ids):
    return router.place(RouteRequest(request_id, token_ids=token_ids, max_tokens=8))


def store(router, worker, seq, hashes):
    assert router.index.apply(worker, seq, [BlockStored(list(hashes), None, [0] * (BLOCK * len(hashes)), BLOCK)])


FIRST_REASON = {"prefix_affinity": "least_load", "preble": "explore"}
LATER_REASON = {"prefix_affinity": "cache_hit", "preble": "exploit"}


# ---------------------------------------------------------------------------------------------- bursts


@pytest.mark.parametrize("colocated", [False, True])
@pytest.mark.parametrize("num_prefill", [2, 4])
@pytest.mark.parametrize("policy", ["prefix_affinity", "preble"])
def test_a_burst_sharing_a_new_prefix_lands_on_one_worker(policy, num_prefill, colocated):
    router = make_router(policy, num_prefill, colocated)
    placements = [place(router, f"a{i}", prompt(1, i)) for i in range(8)]  # no snapshot, no event, no time
    assert [p.prefill_worker for p in placements] == ["p0"] * 8
    assert [p.reason for p in placements] == [FIRST_REASON[policy]] + [LATER_REASON[policy]] * 7
    assert [p.predicted_hit_tokens for p in placements] == [0] + [PREFIX_TOKENS] * 7
    assert router.load.get("p0").queued_prefill_tokens == 544 + 7 * 32  # pending hits are not recomputed
    # a second burst with another new prefix goes to the least loaded worker, and stays there
    placements = [place(router, f"b{i}", prompt(2, i)) for i in range(8)]
    assert [p.prefill_worker for p in placements] == ["p1"] * 8
    assert [p.reason for p in placements] == [FIRST_REASON[policy]] + [LATER_REASON[policy]] * 7


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("prefix_affinity", ["p0", "p1"] * 4),  # each request sees no hit and goes to the least loaded
        ("preble", ["p0", "p1"] * 4),  # each explores: the other worker has less in flight
    ],
)
def test_without_pending_claims_the_same_burst_scatters(policy, expected):
    router = make_router(policy, pending_block_ttl_s=0)
    assert [place(router, f"a{i}", prompt(1, i)).prefill_worker for i in range(8)] == expected
    assert router.index.num_pending_placements() == 0 and len(router.index) == 0


def test_preble_keeps_a_long_burst_on_its_holder_until_its_ttft_says_otherwise():
    router = make_router("preble")
    placements = [place(router, f"a{i}", prompt(1, i)) for i in range(11)]
    # no TTFT reported yet: no overload, no replication (tests/unit/test_router_preble.py replicates)
    assert [(p.prefill_worker, p.reason) for p in placements] == [("p0", "explore")] + [("p0", "exploit")] * 10


def test_prefix_affinity_balances_a_long_burst_only_past_its_absolute_threshold():
    router = make_router("prefix_affinity")
    placements = [place(router, f"a{i}", prompt(1, i)) for i in range(35)]
    assert [p.prefill_worker for p in placements] == ["p0"] * 33 + ["p1", "p1"]
    assert placements[33].reason == "balance"  # p0 waits 33 > 32 + p1's 0
    assert placements[34].reason == "cache_hit"  # 33 - 1 = 32 is not above: both claim the prefix, p1 less loaded


# ---------------------------------------------------------------------------------------------- reconcile


def test_claims_are_counted_per_placement_and_confirmed_by_the_workers_events():
    router = make_router("prefix_affinity")
    a, b = blocks_of(prompt(1, 0)), blocks_of(prompt(1, 1))
    assert a[:32] == b[:32] and not set(a[32:]) & set(b[32:])
    place(router, "a", prompt(1, 0))
    place(router, "b", prompt(1, 1))
    assert router.index.pending_blocks("p0") == {**dict.fromkeys(a[:32], 2), **dict.fromkeys(a[32:] + b[32:], 1)}
    assert router.index.blocks("p0") == frozenset() and router.index.pending_blocks("p1") == {}
    assert router.index.match(b) == {"p0": 34}
    store(router, "p0", 0, a)  # a's prefill ran: its blocks are ordinary held blocks now
    assert router.index.blocks("p0") == frozenset(a)
    assert router.index.pending_blocks("p0") == dict.fromkeys(b[32:], 1)
    router.release("b")  # b abandoned: its suffix goes, the shared prefix stays (confirmed by a's event)
    assert router.index.pending_blocks("p0") == {} and router.index.num_pending_placements() == 1
    assert router.index.match(b) == {"p0": 32}
    router.release("a")  # after the confirmation: the stored blocks stay
    assert router.index.match(a) == {"p0": 34} and router.index.num_pending_placements() == 0


def test_claims_expire_after_the_ttl_unless_confirmed():
    clock = Clock()
    router = make_router("prefix_affinity", clock=clock, pending_block_ttl_s=10.0)
    a, b = blocks_of(prompt(1, 0)), blocks_of(prompt(1, 1))
    place(router, "a", prompt(1, 0))
    clock.now += 5
    assert place(router, "b", prompt(1, 1)).prefill_worker == "p0"
    clock.now += 4.99  # a is 9.99 s old
    assert router.index.match(a) == {"p0": 34}
    clock.now += 0.02  # a is 10.01 s old: its claims end; b's (5.01 s) stay
    assert router.index.pending_blocks("p0") == {**dict.fromkeys(b[:32], 1), **dict.fromkeys(b[32:], 1)}
    assert router.index.match(a) == {"p0": 32} and router.index.match(b) == {"p0": 34}
    clock.now += 5
    assert router.index.pending_blocks("p0") == {} and router.index.match(b) == {}
    assert len(router.index) == 0 and router.index.num_pending_placements() == 0


def test_a_refused_request_is_released_and_leaves_no_claim():
    router = make_router("preble")
    place(router, "a", prompt(1, 0))
    router.release("a")
    assert router.index.pending_blocks("p0") == {} and len(router.index) == 0
    assert router.load.num_inflight() == 0
    assert place(router, "b", prompt(1, 1)).reason == "explore"  # nothing to exploit any more


def test_removing_or_replaying_a_worker_ends_its_claims():
    router = make_router("prefix_affinity")
    a, c = blocks_of(prompt(1, 0)), blocks_of(prompt(2, 0))
    place(router, "a", prompt(1, 0))  # p0
    place(router, "c", prompt(2, 0))  # p1 (least loaded)
    store(router, "p1", 0, c[:3])
    router.index.replace_worker("p1", 5, [(h, None) for h in c[:2]])  # the replay is the worker's whole truth
    assert router.index.blocks("p1") == frozenset(c[:2]) and router.index.pending_blocks("p1") == {}
    assert router.index.match(c) == {"p1": 2} and router.index.num_pending_placements() == 1
    router.remove_worker("p0")
    assert router.index.pending_blocks("p0") == {} and router.index.match(a) == {}
    assert router.index.num_pending_placements() == 0 and len(router.index) == 2
    router.release("a")  # nothing left to release: no error


def test_events_on_claimed_blocks_never_break_the_index():
    router = make_router("prefix_affinity")
    a = blocks_of(prompt(1, 0))
    place(router, "a", prompt(1, 0))
    assert router.index.apply("p0", 0, [BlockRemoved([a[0], a[5]])])  # removal of blocks only claimed: ignored
    assert router.index.pending_blocks("p0") == dict.fromkeys(a, 1) and router.index.match(a) == {"p0": 34}
    assert router.index.apply("p0", 1, [AllBlocksCleared()])  # drops what p0 held; placed requests still store
    assert router.index.match(a) == {"p0": 34}
    store(router, "p0", 2, a[:4])
    assert router.index.apply("p0", 3, [BlockRemoved([a[1]])])  # a confirmed block is an ordinary one
    assert router.index.blocks("p0") == frozenset({a[0], a[2], a[3]})
    assert router.index.pending_blocks("p0") == dict.fromkeys(a[4:], 1)
    assert router.index.match(a) == {"p0": 1}


# ---------------------------------------------------------------------------------------------- other gateways


def tell(router, placement, request_id, token_ids):
    return router.record_remote_placement(
        request_id,
        placement.prefill_worker,
        blocks_of(token_ids),
        len(token_ids),
        decode_worker=placement.decode_worker,
        max_tokens=8,
    )


@pytest.mark.parametrize("policy", ["prefix_affinity", "preble"])
def test_a_burst_placed_by_another_gateway_steers_this_ones_placements(policy):
    a, b = make_router(policy), make_router(policy)
    burst = [(f"a{i}", prompt(1, i)) for i in range(4)]
    placed = [place(a, request_id, token_ids) for request_id, token_ids in burst]
    assert [p.prefill_worker for p in placed] == ["p0"] * 4
    assert all(tell(b, p, request_id, token_ids) for p, (request_id, token_ids) in zip(placed, burst))
    pending = b.index.pending_blocks("p0")
    assert pending == a.index.pending_blocks("p0")
    assert b.load.get("p0").queued_prefill_tokens == 544 + 3 * 32 and b.load.get("p0").num_waiting == 4
    for decode_worker in ("d0", "d1"):  # a alternated them: 2 each, 35 blocks each ((544 + 8) / 16)
        assert b.load.get(decode_worker).num_decoding == 2
        assert b.load.get(decode_worker).num_free_blocks == (1 << 40) - 2 * 35
    assert not tell(b, placed[0], *burst[0])  # reported twice: nothing changes
    assert b.index.pending_blocks("p0") == pending and b.load.get("p0").num_waiting == 4
    mine = place(b, "b0", prompt(1, 99))
    assert (mine.prefill_worker, mine.reason, mine.predicted_hit_tokens) == ("p0", LATER_REASON[policy], 512)
    assert not tell(b, mine, "b0", prompt(1, 99))  # its own placement echoed back: nothing changes
    stats = b.stats()
    assert stats.decisions == {(policy, LATER_REASON[policy]): 1}
    assert (stats.num_placements, stats.num_prompt_tokens, stats.predicted_hit_tokens) == (1, 544, 512)
    b.load.update(WorkerLoad("p0", "prefill", 4, 0, 0.0, 1000, 128, 0))  # the worker now counts them itself
    assert b.load.get("p0").queued_prefill_tokens == 128 + 32  # only b0, not acknowledged, is still in flight


def test_two_gateways_interleaving_one_burst_keep_it_on_one_worker():
    routers = [make_router("preble"), make_router("preble")]
    picks = []
    for i in range(8):
        here, there = routers[i % 2], routers[1 - i % 2]
        placement = place(here, f"r{i}", prompt(1, i))
        assert tell(there, placement, f"r{i}", prompt(1, i))
        picks.append((placement.prefill_worker, placement.reason))
    assert picks == [("p0", "explore")] + [("p0", "exploit")] * 7


def test_remote_placements_are_released_expire_and_ignore_unknown_workers():
    clock = Clock()
    router = make_router("prefix_affinity", clock=clock)
    hashes = blocks_of(prompt(1, 0))
    assert not router.record_remote_placement("x", "p9", hashes, 544)  # not a prefill worker here
    assert router.index.num_pending_placements() == 0 and router.load.num_inflight() == 0
    assert router.record_remote_placement("y", "p1", hashes, 544, acknowledged=False)
    assert router.index.pending_blocks("p1") == dict.fromkeys(hashes, 1)
    assert router.load.get("p1").queued_prefill_tokens == 544
    router.release("y")
    assert router.index.pending_blocks("p1") == {} and router.load.num_inflight() == 0
    assert not router.record_remote_placement("y", "p1", hashes, 544)  # released, still remembered
    assert router.record_remote_placement("z", "p1", hashes, 544)
    clock.now += 10.01
    assert router.index.match(hashes) == {} and router.load.num_inflight() == 0
    with pytest.raises(ValueError, match="do not fit"):
        router.record_remote_placement("w", "p1", hashes, 543)


def test_remembered_request_ids_are_bounded():
    router = make_router("prefix_affinity", max_remembered_request_ids=2)
    hashes = blocks_of(prompt(1, 0))
    for request_id in ("a", "b", "c"):
        assert router.record_remote_placement(request_id, "p0", hashes, 544)
    assert not router.record_remote_placement("c", "p0", hashes, 544)
    assert router.record_remote_placement("a", "p0", hashes, 544)  # forgotten: recorded again (claims replaced)
    assert router.index.pending_blocks("p0") == dict.fromkeys(hashes, 3)


def test_a_remote_placement_on_a_colocated_worker_counts_its_decode_there():
    router = make_router("preble", colocated=True)
    hashes = blocks_of(prompt(1, 0))
    assert router.record_remote_placement("x", "p1", hashes, 544, decode_worker="p0", max_tokens=8)
    load = router.load.get("p1")
    assert (load.queued_prefill_tokens, load.num_waiting, load.num_decoding) == (544, 1, 1)
    assert load.num_free_blocks == (1 << 40) - 35 and router.load.get("p0").num_decoding == 0
    placement = place(router, "y", prompt(1, 1))
    assert (placement.prefill_worker, placement.decode_worker, placement.reason) == ("p1", "p1", "exploit")


def test_a_remote_request_served_whole_by_a_decode_worker_counts_there():
    """n > 1, or another gateway's fallback while no prefill worker is up: the decode worker computes the prompt."""
    router = make_router("preble")
    hashes = blocks_of(prompt(1, 0))
    assert router.record_remote_placement("x", "d1", hashes, 544, max_tokens=8)
    load = router.load.get("d1")
    assert (load.queued_prefill_tokens, load.num_waiting, load.num_decoding) == (544, 1, 1)
    assert load.num_free_blocks == (1 << 40) - 35 and router.index.pending_blocks("d1") == dict.fromkeys(hashes, 1)
    assert not router.record_remote_placement("y", "d9", hashes, 544)  # in no pool here
