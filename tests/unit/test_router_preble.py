"""Preble (services.router.policies.preble) on hand-computed cases: the load cost over its window, the
prefill-time fit, the eviction cost, rebalancing by moving prefix subtrees, replication on overload.

Unless a test fits the model, the prior holds: prefill_time(extend, context) = 1e-4 s × extend.
"""

import dataclasses
import random

import msgspec
import pytest

from services.common.block_hash import hash_request_blocks
from services.common.control import FinishedRequestTiming, StepTiming
from services.common.kv_events import BlockRemoved, BlockStored
from services.router.index import PrefixIndex
from services.router.load import LoadView, WorkerLoad
from services.router.policies import Preble, PrebleConfig, PrefillRequest
from services.router.policies.base import least_cost
from services.router.policies.preble import _Costs
from services.router.policies.preble_model import PrefillTimeFit
from services.router.policies.preble_tree import PrefixTree
from tests.unit.router_fixtures import Clock, tokens

BLOCK = 4
WORKERS = ["w0", "w1", "w2"]
PER_TOKEN_S = 1e-4  # the prior


def request(prompt, request_id="r"):
    return PrefillRequest(request_id, hash_request_blocks(prompt, BLOCK), len(prompt), BLOCK)


def worker_load(worker, queued=0, decoding=0, free=1000, total=0, finished=(), steps=()):
    load = WorkerLoad(worker, "prefill", 0, 0, 0.0, free, queued, decoding)
    return dataclasses.replace(load, num_total_blocks=total, recent_finished=tuple(finished), recent_steps=tuple(steps))


def cluster(clock, workers=WORKERS):
    view = LoadView(clock=clock)
    for worker in workers:
        view.update(worker_load(worker))
    return view


def shared(family, own, num_shared=32, num_own=4):
    """A prompt: `family`'s first num_shared tokens, then num_own tokens of its own (`own`)."""
    return tokens(num_shared, family) + tokens(num_own, 10_000 + own)


def place(policy, request_id, prompt, load, candidates=WORKERS, index_match=None):
    return policy.choose_prefill(request(prompt, request_id), candidates, index_match or {}, load)


def finished(seq, request_id, ttft_s=0.1, num_output_tokens=1, tpot_s=0.0):
    return FinishedRequestTiming(seq, request_id, num_output_tokens, ttft_s, tpot_s)


# ---------------------------------------------------------------------------------------------- load cost


def test_load_cost_by_hand_miss_rate_replicas_queue_and_decode():
    clock = Clock()
    load, policy = cluster(clock), Preble()
    assert place(policy, "a", tokens(40, 1), load).worker == "w0"  # explore: all idle, the earliest
    # b shares a's first 8 blocks: the tree splits a there, and the 32-token head is both requests'
    # important node (a's 2-block tail and b's are shorter than the 32 tokens before them)
    b = place(policy, "b", shared(1, 1, num_own=8), load, index_match={"w0": 8})
    assert (b.worker, b.reason) == ("w0", "exploit")  # 32 cached > 8 to compute; b misses 8
    c = place(policy, "c", shared(1, 2, num_own=8), load, candidates=["w1"], index_match={"w0": 8})
    assert (c.worker, c.reason) == ("w1", "explore")  # w1 holds nothing: c misses all 40
    node = policy.node_load("a")
    assert node is policy.node_load("b") is policy.node_load("c")
    assert (node.count, node.prompt_tokens, node.missed_tokens, node.replicas) == (3, 120, 88, 2)
    assert (node.num_tokens, node.context_tokens) == (32, 32)
    # miss 88/120 x count 3 x prefill_time(32, 32) = 32e-4 s, over 2 replicas
    per_replica = 88 / 120 * 3 * 32 * PER_TOKEN_S / 2
    assert policy.window_load("w0") == pytest.approx(per_replica)
    assert policy.window_load("w1") == pytest.approx(per_replica)
    assert policy.window_load("w2") == 0.0
    for worker in WORKERS:
        assert policy.window_load(worker) == pytest.approx(policy.window_load_reference(worker))

    # the waiting queue (queued prefill tokens, at b s a token) and the decode term (priors: 256 tokens, 20 ms)
    clock.now += 6  # past the load view's 5 s decode window: the next snapshots alone count
    load.update(worker_load("w0", queued=1000))
    load.update(worker_load("w1", decoding=3))
    assert policy.load_cost("w0", load) == pytest.approx(per_replica + 1000 * PER_TOKEN_S)
    assert policy.load_cost("w1", load) == pytest.approx(per_replica + 3 * 256 * 0.02)

    # 250 finished requests on w1: the medians cover the last 200 (output lengths 52..251, TPOT / 1000)
    reports = [finished(i, f"x{i}", num_output_tokens=i + 2, tpot_s=(i + 2) / 1000) for i in range(250)]
    reports.append(finished(250, "handoff", num_output_tokens=1))  # a prefill-only handoff: no decode sample
    load.update(worker_load("w1", decoding=3, finished=reports))
    policy.take_reports(load)
    assert policy.decode_tokens.median == 151.5
    assert policy.tpot("w1") == pytest.approx(0.1515)
    assert policy.tpot("w2") == pytest.approx(0.1515)  # no TPOT of its own yet: every worker's median
    assert policy.load_cost("w1", load) == pytest.approx(per_replica + 3 * 151.5 * 0.1515)

    # 180 s later the window has forgotten a, b and c: their node load, its sums and its assignment go
    clock.now += 180.01
    place(policy, "d", tokens(8, 2), load, candidates=["w2"])
    assert policy.window_load("w0") == policy.window_load("w1") == 0.0
    assert policy.node_load("a") is None and policy.node_load("d") is not None


def test_the_window_keeps_at_most_max_window_requests():
    clock = Clock()
    load, policy = cluster(clock), Preble(PrebleConfig(max_window_requests=2))
    for i in range(3):
        place(policy, f"r{i}", tokens(8, i), load, candidates=["w0"])
    assert policy.node_load("r0") is None  # pushed out by the third
    assert policy.window_load("w0") == pytest.approx(2 * 8 * PER_TOKEN_S)


def test_explore_weighs_the_fitted_prefill_time_of_the_missed_tokens():
    clock = Clock()
    load, policy = cluster(clock), Preble()
    prompt = tokens(40)  # w0 holds 2 blocks: 8 <= 32 explores
    load.update(worker_load("w0", queued=7))  # w0: 7 queued + 32 to compute = 39 tokens of work; w1: 40
    decision = policy.choose_prefill(request(prompt), WORKERS, {"w0": 2}, load)
    assert (decision.worker, decision.reason) == ("w0", "explore")
    load = cluster(clock)
    load.update(worker_load("w0", queued=9))  # 41 > 40
    assert Preble().choose_prefill(request(prompt), WORKERS, {"w0": 2}, load).worker == "w1"


# ---------------------------------------------------------------------------------------------- the fit


def test_prefill_time_fit_recovers_known_coefficients():
    fit = PrefillTimeFit(max_samples=256, min_samples=32, prior_s_per_token=PER_TOKEN_S)
    assert fit.coefficients == (0.0, PER_TOKEN_S, 0.0) and fit.prefill_time(100, 1000) == pytest.approx(0.01)
    rng = random.Random(0)
    a, b, c = 0.004, 6e-5, 2e-10
    for i in range(300):
        steps, num_tokens = rng.choice([1, 1, 1, 2]), rng.randint(1, 8192)
        pairs = num_tokens * rng.randint(num_tokens, 32768)
        fit.add(steps, num_tokens, pairs, a * steps + b * num_tokens + c * pairs)
        assert fit.fitted == (i + 1 >= 32)  # the prior until min_samples timings
    assert fit.coefficients == pytest.approx((a, b, c), rel=1e-6)
    assert len(fit) == 256  # a bounded recent sample
    assert fit.prefill_time(1000, 5000) == pytest.approx(a + b * 1000 + c * 1000 * 5000)

    noisy = PrefillTimeFit(max_samples=256, min_samples=32, prior_s_per_token=PER_TOKEN_S)
    for _ in range(256):
        num_tokens = rng.randint(1, 8192)
        pairs = num_tokens * rng.randint(num_tokens, 32768)
        noisy.add(1, num_tokens, pairs, (a + b * num_tokens + c * pairs) * rng.uniform(0.98, 1.02))
    assert noisy.coefficients == pytest.approx((a, b, c), rel=0.15)


def test_prefill_time_fit_never_goes_negative():
    rng = random.Random(1)
    fit = PrefillTimeFit(max_samples=256, min_samples=32, prior_s_per_token=PER_TOKEN_S)
    for _ in range(200):  # purely linear in tokens, no step overhead, no attention: noise pulls some below 0
        num_tokens = rng.randint(1, 8192)
        fit.add(1, num_tokens, num_tokens * rng.randint(1, 100), 5e-5 * num_tokens * rng.uniform(0.9, 1.1))
    assert fit.fitted and min(fit.coefficients) >= 0.0
    assert fit.coefficients[1] == pytest.approx(5e-5, rel=0.05)


def test_the_policy_fits_the_step_timings_the_workers_report():
    clock = Clock()
    load, policy = cluster(clock), Preble()
    a, b, c = 0.01, 2e-5, 1e-9
    steps = [StepTiming(i, 1, 64 * (i + 1), 64 * (i + 1) * 1000 * (i % 7 + 1), 0.0) for i in range(40)]
    steps = [msgspec.structs.replace(s, duration_s=a + b * s.num_tokens + c * s.num_attention_pairs) for s in steps]
    for start in range(0, 40, 8):  # rings of the last 16, resent: each timing counts once
        load.update(worker_load("w0", steps=steps[max(0, start - 8) : start + 8]))
    place(policy, "r", tokens(8), load)
    assert len(policy.fit) == 40
    assert policy.fit.coefficients == pytest.approx((a, b, c), rel=1e-6)


# ---------------------------------------------------------------------------------------------- eviction


def store(index, worker, seq, prompt):
    hashes = hash_request_blocks(prompt, BLOCK)
    assert index.apply(worker, seq, [BlockStored(hashes, None, prompt[: len(hashes) * BLOCK], BLOCK)])
    return hashes


def test_eviction_cost_by_hand_on_a_worker_at_capacity():
    clock = Clock()
    index, policy, load = PrefixIndex(clock=clock), Preble(), cluster(clock)
    policy.bind_index(index)
    held = {}
    for seq, (request_id, prompt) in enumerate([("p1", tokens(24, 1)), ("p2", tokens(24, 2)), ("p3", tokens(32, 3))]):
        place(policy, request_id, prompt, load, candidates=["w0"])  # 6, 6 and 8 blocks, least recent first
        held[request_id] = store(index, "w0", seq, prompt)
    # w0 caches 20 blocks of 20, 6 of them free (cached, unreferenced): no empty block
    load.update(worker_load("w0", free=6, total=20))
    # each node load: miss 1 x count 1 x prefill_time(its tokens) on its one worker
    p1, p2, p3 = 24 * PER_TOKEN_S, 24 * PER_TOKEN_S, 32 * PER_TOKEN_S
    assert policy.eviction_cost("w0", request(tokens(32, 4)), 0, load) == pytest.approx(p1 + p2)  # 8 blocks: p1, p2
    assert policy.eviction_cost("w0", request(tokens(24, 5)), 0, load) == pytest.approx(p1)  # 6 blocks: p1 alone
    assert policy.eviction_cost("w0", request(tokens(36, 6)), 0, load) == pytest.approx(p1 + p2)  # 9 blocks
    # a hit needs fewer new blocks: 32 tokens, 28 of them cached, is 1 new block
    assert policy.eviction_cost("w0", request(tokens(32, 3)), 28, load) == pytest.approx(p1)
    load.update(worker_load("w0", free=14, total=28))  # 20 cached, 14 referenced: 8 empty blocks
    assert policy.eviction_cost("w0", request(tokens(32, 4)), 0, load) == 0.0
    assert policy.eviction_cost("w0", request(tokens(36, 4)), 0, load) == pytest.approx(p1)  # 9 > 8
    load.update(worker_load("w0", free=6, total=0))  # capacity not reported
    assert policy.eviction_cost("w0", request(tokens(32, 4)), 0, load) == 0.0
    # the worker evicted p1 itself: the walk (rebuilt after eviction_refresh_s) forgets it
    assert index.apply("w0", 3, [BlockRemoved(held["p1"])])
    load.update(worker_load("w0", free=12, total=20))  # 14 cached, 6 referenced: 6 empty
    clock.now += 1.5
    assert policy.eviction_cost("w0", request(tokens(32, 4)), 0, load) == pytest.approx(p2)  # 8 - 6 empty = 2
    assert policy.eviction_cost("w0", request(tokens(56, 4)), 0, load) == pytest.approx(p2 + p3)  # 14 - 6


def test_eviction_cost_steers_exploration_away_from_a_full_worker():
    clock = Clock()
    index, policy, load = PrefixIndex(clock=clock), Preble(), cluster(clock, ["w0", "w1"])
    policy.bind_index(index)
    place(policy, "hot", tokens(40, 1), load, candidates=["w0"])
    store(index, "w0", 0, tokens(40, 1))
    load.update(worker_load("w0", free=0, total=10))  # full of the hot prompt
    load.update(worker_load("w1", queued=30, free=10, total=10))  # 30 tokens queued, but room
    # w0: 40 to compute + evicting hot's 40 tokens of work; w1: 40 + 30 queued
    decision = place(policy, "new", tokens(40, 2), load, candidates=["w0", "w1"])
    assert (decision.worker, decision.reason) == ("w1", "explore")


# ---------------------------------------------------------------------------------------------- rebalancing


def families_on_w0(policy, load, num_families, index=None):
    """Two requests per family, all on w0: each family's 32-token prefix is an important node of count 2."""
    for f in range(num_families):
        for i in range(2):
            place(policy, f"f{f}-{i}", shared(100 + f, i), load, candidates=["w0"])
        if index is not None:
            store(index, "w0", f, shared(100 + f, 0))


def test_rebalancing_waits_for_50_requests_per_worker_then_moves_the_cheapest_nodes_first():
    clock = Clock()
    index, policy, load = PrefixIndex(clock=clock), Preble(), cluster(clock, ["w0", "w1"])
    policy.bind_index(index)
    families_on_w0(policy, load, 49, index)  # 98 placements; w0's window load is 49 x 2 x 32e-4
    held_before = index.blocks("w0")
    assert policy.window_load("w0") == pytest.approx(49 * 2 * 32 * PER_TOKEN_S)
    place(policy, "n98", tokens(36, 1), load, candidates=["w0", "w1"])
    place(policy, "n99", tokens(36, 2), load, candidates=["w0", "w1"])
    assert policy.num_moves == 0  # 98, then 99 placements before: below 50 x 2
    place(policy, "n100", tokens(36, 3), load, candidates=["w0", "w1"])  # 100 before it: a check
    assert policy.num_moves > 0
    w0, w1 = policy.window_load("w0"), policy.window_load("w1")
    assert w0 >= w1 - 36 * PER_TOKEN_S and abs(w0 - w1) < 3 * 64 * PER_TOKEN_S  # balanced, never inverted
    for worker in ("w0", "w1"):
        assert policy.window_load(worker) == pytest.approx(policy.window_load_reference(worker))
    moved = [f for f in range(49) if policy.node_load(f"f{f}-0").workers == 0b10]
    assert len(moved) == policy.num_moves and moved == list(range(len(moved)))  # equal costs: oldest first
    for f in range(49):
        node_load = policy.node_load(f"f{f}-0")
        assert node_load.workers in (0b01, 0b10)  # on one worker or the other, never both
        assert node_load.node.stats is node_load and node_load.count == 2  # the tree still points at it
    assert index.blocks("w0") == held_before  # the router's index is the workers' truth: untouched

    # a moved family's next request follows its node to w1, though w0 holds its prefix; others stay
    load.update(worker_load("w0", queued=2000))
    first_moved, last_kept = moved[0], moved[-1] + 1
    decision = place(policy, "m", shared(100 + first_moved, 7), load, ["w0", "w1"], {"w0": 8})
    assert (decision.worker, decision.reason) == ("w1", "exploit")
    decision = place(policy, "k", shared(100 + last_kept, 7), load, ["w0", "w1"], {"w0": 8})
    assert (decision.worker, decision.reason) == ("w0", "exploit")


@pytest.mark.parametrize("queued_on_w1, moves", [(2134, False), (2133, True)])
def test_rebalancing_needs_the_busiest_above_1_5_times_the_least_busy(queued_on_w1, moves):
    clock = Clock()
    policy, load = Preble(), cluster(clock, ["w0", "w1"])
    families_on_w0(policy, load, 50)  # w0: 50 x 2 x 32e-4 = 0.32 s
    # w1: 2134 queued tokens = 0.2134 s; 1.5 x 0.2134 = 0.3201 >= 0.32. With 2133: 0.31995 < 0.32
    load.update(worker_load("w1", queued=queued_on_w1))
    place(policy, "trigger", tokens(4, 1), load, candidates=["w0", "w1"])
    assert (policy.num_moves > 0) == moves


def test_rebalancing_leaves_a_single_hot_node_to_the_detector():
    clock = Clock()
    policy, load = Preble(), cluster(clock, ["w0", "w1"])
    families_on_w0(policy, load, 1)  # one node with 2 requests
    for i in range(98):  # single requests: not worth moving (fewer than rebalance_min_requests)
        place(policy, f"s{i}", tokens(36, 1000 + i), load, candidates=["w0"])
    place(policy, "trigger", tokens(4, 1), load, candidates=["w0", "w1"])
    assert policy.num_moves == 0


# ---------------------------------------------------------------------------------------------- replication


def test_a_hot_prefix_is_replicated_only_when_its_ttft_doubles():
    clock = Clock()
    load, policy = cluster(clock), Preble()
    load.update(worker_load("w1", queued=100))  # the replica goes to the cheaper other worker: w2
    hit = {"w0": 8}
    assert place(policy, "a0", shared(1, 0), load).reason == "explore"
    for i in range(1, 4):
        assert (place(policy, f"a{i}", shared(1, i), load, index_match=hit).reason) == "exploit"
    load.update(worker_load("w0", finished=[finished(0, "a0", 0.1), finished(1, "a1", 0.1)]))
    load.update(worker_load("w1", queued=100, finished=[finished(0, "a2", 9.0)]))  # not where a2 ran: ignored
    policy.take_reports(load)  # (each placement reads the reports first; TTFTs are dated on arrival)
    clock.now += 100  # a0 and a1's TTFTs are now in the first half of the 180 s window
    reports = [finished(0, "a0", 0.1), finished(1, "a1", 0.1), finished(2, "a2", 0.19), finished(3, "a3", 0.2)]
    load.update(worker_load("w0", finished=reports))
    assert place(policy, "a4", shared(1, 4), load, index_match=hit).reason == "exploit"  # 0.195 < 2 x 0.1
    load.update(worker_load("w0", finished=[*reports, finished(4, "a4", 0.25)]))
    decision = place(policy, "a5", shared(1, 5), load, index_match=hit)  # (0.19 + 0.2 + 0.25) / 3 >= 0.2
    assert (decision.worker, decision.reason) == ("w2", "replicate")
    node_load = policy.node_load("a5")
    assert node_load.workers == 0b101 and node_load.replicas == 2
    assert policy.window_load("w2") == pytest.approx(policy.window_load_reference("w2"))
    # the trend that fired is cleared: the next request chooses between the two by cost
    assert place(policy, "a6", shared(1, 6), load, index_match=hit).reason == "exploit"


def test_without_ttft_reports_a_long_burst_is_never_replicated():
    clock = Clock()
    load, policy = cluster(clock), Preble()
    reasons = [place(policy, "b0", shared(2, 0), load).reason]
    reasons += [place(policy, f"b{i}", shared(2, i), load, index_match={"w0": 8}).reason for i in range(1, 20)]
    assert reasons == ["explore"] + ["exploit"] * 19


# ---------------------------------------------------------------------------------------------- the pieces


def test_the_prefix_tree_splits_and_keeps_each_requests_statistics_at_its_important_node():
    clock = Clock()
    load, policy = cluster(clock), Preble()
    place(policy, "long", tokens(48, 1), load)  # 12 blocks: one node
    place(policy, "short", tokens(16, 1) + tokens(4, 99), load)  # shares 4 blocks: head [0, 4), tails
    # long's tail [4, 12) is longer than the 4 blocks before it: it stays long's important node
    long_node, short_node = policy.node_load("long"), policy.node_load("short")
    assert (long_node.num_tokens, long_node.context_tokens) == (32, 48)
    assert (short_node.num_tokens, short_node.context_tokens) == (16, 16)  # the head: 4 > 0 blocks before
    place(policy, "mid", tokens(24, 1) + tokens(4, 98), load)  # splits long's tail at 6 blocks
    # long's tail [6, 12) is 6 blocks after 6: not longer any more; [4, 6) is not either, so long's
    # requests now count at the head [0, 4), short's node: one node load for both
    assert policy.node_load("long") is policy.node_load("short") is policy.node_load("mid")
    assert policy.node_load("long").count == 3
    for worker in WORKERS:
        assert policy.window_load(worker) == pytest.approx(policy.window_load_reference(worker))


def test_the_prefix_tree_prunes_its_least_recently_used_leaves():
    tree = PrefixTree(max_blocks=10)
    (a,) = tree.insert([1, 2, 3, 4], now=0.0)
    head, b = tree.insert([1, 2, 5, 6], now=1.0)  # splits a: a keeps its tail, a new head takes [1, 2]
    assert (list(head.hashes), list(a.hashes), list(b.hashes)) == ([1, 2], [3, 4], [5, 6])
    assert a.parent is head and b.parent is head and (a.start, head.start) == (2, 0)
    assert [list(n.hashes) for n in tree.nodes()] == [[3, 4], [5, 6], [1, 2]]  # leaves before their parent
    tree.insert([7, 8, 9, 10], now=2.0)  # 10 blocks in all: within the bound
    tree.prune(horizon=0.5)  # [3, 4] was touched at 0.0
    assert tree.num_blocks == 8 and [list(n.hashes) for n in tree.nodes()] == [[5, 6], [1, 2], [7, 8, 9, 10]]
    tree.max_blocks = 4
    tree.prune(horizon=0.0)  # over the bound: the oldest leaves go, [5, 6] then its parent
    assert [list(n.hashes) for n in tree.nodes()] == [[7, 8, 9, 10]]


@pytest.mark.parametrize("seed", range(20))
def test_costs_find_the_same_worker_as_every_cost_computed(seed):
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(8)]
    lower = {w: float(rng.randint(0, 5)) for w in workers}
    evict = {w: float(rng.choice([0, 0, 1, 3])) for w in workers}
    costs = _Costs(workers, lambda ws, into: into.update({w: lower[w] for w in ws if w not in into}), evict.__getitem__)
    subset = [w for w in workers if rng.random() < 0.7] or workers
    full = {w: lower[w] + evict[w] for w in workers}
    assert costs.cheapest(subset) == least_cost(subset, full)


def test_the_load_view_logs_each_timing_once_and_a_restarted_worker_again():
    view = LoadView(clock=Clock())
    steps = [StepTiming(i, 1, 10, 100, 0.01) for i in range(5)]
    view.update(worker_load("w0", steps=steps[:3]))
    view.update(worker_load("w0", steps=steps[1:5]))  # the ring again, with two new ones
    new, cursor = view.step_timings_since(0)
    assert [t.seq for _, t in new] == [0, 1, 2, 3, 4] and cursor == 5
    view.update(worker_load("w0", steps=steps[:1]))  # seq 0 again: the worker restarted
    new, cursor = view.step_timings_since(cursor)
    assert [t.seq for _, t in new] == [0] and cursor == 6
    assert view.step_timings_since(cursor) == ([], 6)
