"""Every placement policy on hand-computed cases: the thresholds just below and just above."""

import pytest

from services.common.block_hash import hash_request_blocks
from services.common.kv_events import BlockStored
from services.router.index import PrefixIndex
from services.router.load import LoadView, WorkerLoad
from services.router.policies import (
    LeastLoad,
    LeastLoadConfig,
    Preble,
    PrefillRequest,
    PrefixAffinity,
    PrefixAffinityConfig,
    RoundRobin,
)
from tests.unit.router_fixtures import Clock, tokens

BLOCK = 4
WORKERS = ["w0", "w1", "w2"]


def request(prompt, request_id="r"):
    return PrefillRequest(request_id, hash_request_blocks(prompt, BLOCK), len(prompt), BLOCK)


def cluster(clock=None, **per_worker):
    """A LoadView with one snapshot per worker: w0=dict(queued=.., running=.., waiting=.., decoding=..)."""
    view = LoadView(clock=clock or Clock())
    for worker in WORKERS:
        fields = per_worker.get(worker, {})
        view.update(
            WorkerLoad(
                worker,
                "prefill",
                fields.get("running", 0),
                fields.get("waiting", 0),
                0.0,
                1000,
                fields.get("queued", 0),
                fields.get("decoding", 0),
            )
        )
    return view


def holding(prompt, **num_blocks):
    """index_match from a real index where worker w caches the first num_blocks[w] blocks of `prompt`."""
    index = PrefixIndex()
    hashes = hash_request_blocks(prompt, BLOCK)
    for worker, n in num_blocks.items():
        index.apply(worker, 0, [BlockStored(hashes[:n], None, prompt[: n * BLOCK], BLOCK)])
    return index.match(hashes)


# ---------------------------------------------------------------------------------------------- round robin


def test_round_robin_cycles_in_candidate_order():
    policy, load = RoundRobin(), cluster()
    picks = [policy.choose_prefill(request(tokens(8)), WORKERS, {}, load) for _ in range(5)]
    assert [d.worker for d in picks] == ["w0", "w1", "w2", "w0", "w1"]
    assert {d.reason for d in picks} == {"round_robin"}


# ---------------------------------------------------------------------------------------------- least load


def test_least_load_weighs_queued_tokens_and_running_requests():
    policy = LeastLoad(LeastLoadConfig(running_weight=64))
    # costs: w0 = 100, w1 = 0 + 64 * 2 = 128, w2 = 50 + 64 = 114
    load = cluster(w0={"queued": 100}, w1={"running": 2}, w2={"queued": 50, "running": 1})
    assert policy.choose_prefill(request(tokens(8)), WORKERS, {}, load).worker == "w0"
    load = cluster(w0={"queued": 115}, w1={"running": 2}, w2={"queued": 50, "running": 1})
    decision = policy.choose_prefill(request(tokens(8)), WORKERS, {}, load)
    assert (decision.worker, decision.reason) == ("w2", "least_load")
    assert policy.choose_prefill(request(tokens(8)), WORKERS, {}, cluster()).worker == "w0"  # ties: earliest


def test_least_load_counts_the_routers_inflight_tokens():
    policy, load = LeastLoad(), cluster()
    load.add_inflight("r0", "w0", prefill_tokens=10, requests=1)
    assert policy.choose_prefill(request(tokens(8)), WORKERS, {}, load).worker == "w1"


# ---------------------------------------------------------------------------------------------- prefix affinity


def test_prefix_affinity_cache_threshold_is_strict():
    policy = PrefixAffinity(PrefixAffinityConfig(cache_threshold=0.5))
    prompt = tokens(40)  # 10 blocks; at most 9 can hit (the last token is always computed)
    load = cluster(w0={"running": 5}, w1={"running": 2})  # balanced enough; w2 least loaded
    at_threshold = policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=5), load)  # 20/40 = 0.5
    assert (at_threshold.worker, at_threshold.reason) == ("w2", "least_load")
    above = policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=6), load)  # 24/40 = 0.6
    assert (above.worker, above.reason) == ("w0", "cache_hit")


def test_prefix_affinity_prefers_the_less_loaded_of_equal_matches():
    policy = PrefixAffinity()
    prompt = tokens(40)
    load = cluster(w0={"running": 5}, w1={"running": 3}, w2={"running": 0})
    decision = policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=8, w1=8, w2=2), load)
    assert (decision.worker, decision.reason) == ("w1", "cache_hit")
    decision = policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=9, w1=8), load)
    assert (decision.worker, decision.reason) == ("w0", "cache_hit")


@pytest.mark.parametrize(
    "min_load, max_load, imbalanced",
    [
        (10, 42, False),  # max - min = 32: not above the absolute threshold
        (10, 43, True),  # 33 > 32 and 43 > 15
        (100, 150, False),  # 50 > 32 but 150 = 1.5 * 100: not above the relative threshold
        (100, 151, True),  # 51 > 32 and 151 > 150
        (0, 33, True),
    ],
)
def test_prefix_affinity_balance_needs_both_thresholds(min_load, max_load, imbalanced):
    policy = PrefixAffinity(PrefixAffinityConfig(balance_abs_threshold=32, balance_rel_threshold=1.5))
    prompt = tokens(40)
    # the busiest worker holds most of the prompt; load = running + waiting
    load = cluster(w0={"running": max_load - 3, "waiting": 3}, w1={"running": min_load}, w2={"running": max_load})
    decision = policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=9), load)
    assert (decision.worker, decision.reason) == (("w1", "balance") if imbalanced else ("w0", "cache_hit"))


def test_prefix_affinity_sees_inflight_requests_as_load():
    policy = PrefixAffinity()
    prompt = tokens(40)
    load = cluster(w0={"running": 40}, w1={"running": 7}, w2={"running": 7})  # 40 - 7 = 33 > 32: imbalanced
    assert policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=9), load).reason == "balance"
    load.add_inflight("x", "w1", requests=1)
    load.add_inflight("y", "w2", requests=1)  # min is now 8: 32 is not above the threshold
    assert policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=9), load).reason == "cache_hit"


# ---------------------------------------------------------------------------------------------- preble


def test_preble_load_cost_counts_queued_tokens_and_the_decode_window():
    # in seconds; before any timing is reported the priors hold: prefill 1e-4 s a token, 256 output
    # tokens a request at 20 ms each (the window term and its fit: tests/unit/test_router_preble.py)
    clock = Clock()
    load = cluster(clock, w0={"queued": 100, "decoding": 2})
    policy = Preble()
    assert policy.load_cost("w0", load) == pytest.approx(100e-4 + 2 * 256 * 0.02)
    load.add_inflight("r", "w0", prefill_tokens=50, decoding=1)
    assert policy.load_cost("w0", load) == pytest.approx(150e-4 + 3 * 256 * 0.02)
    clock.now += 1
    load.update(WorkerLoad("w0", "prefill", 0, 0, 0.0, 1000, 100, 4))  # decoding 2 then 4: mean 3 (+1 in flight)
    assert load.mean_decoding("w0") == 4
    clock.now += 5.5  # the first sample leaves the 5 s window; the latest always counts
    assert load.mean_decoding("w0") == 4  # the latest sample alone; the in-flight decode expired after 2 s
    assert policy.fit.prefill_time(8 - 4, 8) == pytest.approx(4e-4)


def test_preble_explores_when_the_match_equals_the_rest_and_exploits_one_block_past_it():
    policy = Preble()
    load = cluster(w0={"queued": 20})
    equal = tokens(32)  # w0 holds 4 blocks = 16 tokens, the rest is 16: explore
    # costs in tokens of prefill work (1e-4 s each, the prior): w0 = (32 - 16) + 20 = 36, w1 = w2 = 32
    decision = policy.choose_prefill(request(equal), WORKERS, holding(equal, w0=4), load)
    assert (decision.worker, decision.reason) == ("w1", "explore")
    past = tokens(36)  # w0 holds 5 blocks = 20 tokens, the rest is 16: one block more than the rest
    load = cluster(w0={"queued": 30})
    decision = policy.choose_prefill(request(past), WORKERS, holding(past, w0=5), load)
    assert (decision.worker, decision.reason) == ("w0", "exploit")  # although w0 costs 16 + 30, w1 only 36


def test_preble_explore_minimises_missed_prefill_plus_load():
    policy = Preble()
    prompt = tokens(40)  # w0 holds 2 blocks: 8 <= 32 explores
    # costs in tokens of prefill work: w0 = 32 + 10 = 42, w1 = 40, w2 = 40 + one decoding sequence (256 x 20 ms)
    load = cluster(w0={"queued": 10}, w2={"decoding": 1})
    assert policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=2), load).worker == "w1"
    load = cluster(w0={"queued": 7})  # w0 = 32 + 7 = 39 < 40
    assert policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=2), load).worker == "w0"


def test_preble_exploit_takes_the_cheapest_holder_of_the_longest_prefix():
    policy = Preble()
    prompt = tokens(40)
    load = cluster(w0={"queued": 50}, w1={"queued": 30})
    decision = policy.choose_prefill(request(prompt), WORKERS, holding(prompt, w0=8, w1=8, w2=3), load)
    assert (decision.worker, decision.reason) == ("w1", "exploit")


# Preble's rebalancing (moving prefix subtrees) and replication (on a TTFT overload) are tested in
# tests/unit/test_router_preble.py.
