"""The peer baselines kv_overlap (Dynamo's KV router cost) and precise_prefix (llm-d's weighted scorers),
placed by hand on small cases: every term of each formula, its thresholds and ties."""

import pytest

from services.common.block_hash import hash_request_blocks
from services.common.kv_events import BlockStored
from services.router.index import PrefixIndex
from services.router.load import LoadView, WorkerLoad
from services.router.policies import (
    KvOverlap,
    KvOverlapConfig,
    PrecisePrefix,
    PrecisePrefixConfig,
    PrefillRequest,
)
from services.router.router import POLICIES, Router, RouteRequest
from tests.unit.router_fixtures import Clock, tokens

BLOCK = 4
WORKERS = ["w0", "w1", "w2"]
PROMPT = tokens(16)  # 4 blocks of 4 tokens


def request(prompt=PROMPT):
    return PrefillRequest("r", hash_request_blocks(prompt, BLOCK), len(prompt), BLOCK)


def cluster(**per_worker):
    """A LoadView with one snapshot per worker: w0=dict(queued=.., waiting=.., usage=.., free=..)."""
    view = LoadView(clock=Clock())
    for worker in WORKERS:
        fields = per_worker.get(worker, {})
        view.update(
            WorkerLoad(
                worker,
                "colocated",
                0,
                fields.get("waiting", 0),
                fields.get("usage", 0.0),
                fields.get("free", 100),
                fields.get("queued", 0),
                0,
            )
        )
    return view


def holding(prompt=PROMPT, **num_blocks):
    """index_match from a real index where worker w caches the first num_blocks[w] blocks of `prompt`."""
    index = PrefixIndex()
    hashes = hash_request_blocks(prompt, BLOCK)
    for worker, n in num_blocks.items():
        index.apply(worker, 0, [BlockStored(hashes[:n], None, prompt[: n * BLOCK], BLOCK)])
    return index.match(hashes)


# ---------------------------------------------------------------------------------------------- kv_overlap
#
# cost(w) = prefill_load_scale * max(queued(w) + 16 - credit * 4 * matched(w), 0) / 4 + active_blocks(w) + 4


def test_kv_overlap_credits_the_cached_prefix():
    policy, load = KvOverlap(), cluster()
    match = holding(w1=3)
    assert policy.costs(request(), WORKERS, match, load) == {"w0": 8.0, "w1": 5.0, "w2": 8.0}
    decision = policy.choose_prefill(request(), WORKERS, match, load)
    assert (decision.worker, decision.reason) == ("w1", "cache_hit")


def test_kv_overlap_without_credit_ignores_the_cache():
    policy = KvOverlap(KvOverlapConfig(overlap_score_credit=0.0))
    decision = policy.choose_prefill(request(), WORKERS, holding(w1=3), cluster())
    assert (decision.worker, decision.reason) == ("w0", "least_cost")  # all cost 8: the earliest


@pytest.mark.parametrize("queued, expected", [(11, "w1"), (12, "w0"), (13, "w0")])
def test_kv_overlap_weighs_queued_prefill_against_the_overlap(queued, expected):
    # w1 holds 3 blocks: (queued + 16 - 12) / 4 + 4 against w0's 16 / 4 + 4 = 8; 12 ties, the earliest wins
    policy = KvOverlap()
    assert policy.choose_prefill(request(), WORKERS, holding(w1=3), cluster(w1={"queued": queued})).worker == expected


def test_kv_overlap_counts_referenced_and_inflight_kv_blocks():
    policy = KvOverlap()
    # w0: usage 0.5 of 20 usable blocks (10 free) = 10 referenced; w1: 2 of 8 referenced; w2: idle
    load = cluster(w0={"usage": 0.5, "free": 10}, w1={"usage": 0.25, "free": 6})
    assert policy.costs(request(), WORKERS, {}, load) == {"w0": 18.0, "w1": 10.0, "w2": 8.0}
    load.add_inflight("x", "w2", kv_blocks=3)  # placed since the snapshot: 3 more blocks held
    assert policy.costs(request(), WORKERS, {}, load)["w2"] == 11.0
    assert policy.choose_prefill(request(), WORKERS, {}, load).worker == "w1"


def test_kv_overlap_reads_or_recovers_the_usable_blocks():
    policy, load = KvOverlap(), cluster(w0={"usage": 0.5, "free": 10})
    policy.costs(request(), WORKERS, {}, load)  # no total reported: learns w0's 20 usable blocks
    load.update(WorkerLoad("w0", "colocated", 0, 0, 1.0, 0, 0, 0))  # every block referenced
    assert policy.active_kv_blocks("w0", load) == 20.0
    load.update(WorkerLoad("w1", "colocated", 0, 0, 1.0, 0, 0, 0, num_total_blocks=12))  # reported
    assert policy.active_kv_blocks("w1", load) == 12.0


def test_kv_overlap_prefill_scale_and_the_clamp_at_zero():
    # scale 0: decode blocks alone (w0 holds 2 referenced blocks, the others none)
    load = cluster(w0={"usage": 0.5, "free": 2})
    policy = KvOverlap(KvOverlapConfig(prefill_load_scale=0.0))
    assert policy.costs(request(), WORKERS, holding(w0=4), load) == {"w0": 6.0, "w1": 4.0, "w2": 4.0}
    # credit 2: w1's prefill term would be 16 - 2 * 12 < 0, and stops at 0
    policy = KvOverlap(KvOverlapConfig(overlap_score_credit=2.0))
    assert policy.costs(request(), WORKERS, holding(w1=3), cluster())["w1"] == 4.0


def test_kv_overlap_ties_go_to_the_earliest_candidate():
    policy = KvOverlap()
    assert policy.choose_prefill(request(), ["w2", "w0", "w1"], {}, cluster()).worker == "w2"
    assert policy.choose_prefill(request(), WORKERS, holding(w1=2, w2=2), cluster()).worker == "w1"


# ---------------------------------------------------------------------------------------------- precise_prefix
#
# score(w) = 2 * prefix(w) + 1 * (1 - usage(w)) + 1 * queue(w)


def test_precise_prefix_normalises_matches_over_the_holders():
    policy, load = PrecisePrefix(), cluster()
    # w0 holds 1 block, w1 3, w2 none: prefix = 0 (the shortest holder), 1, 0
    assert policy.scores(WORKERS, holding(w0=1, w1=3), load) == {"w0": 2.0, "w1": 4.0, "w2": 2.0}
    # a sole holder scores 1 however short its match; equal holders all score 1
    assert policy.scores(WORKERS, holding(w2=1), load) == {"w0": 2.0, "w1": 2.0, "w2": 4.0}
    assert policy.scores(WORKERS, holding(w0=2, w1=2, w2=1), load) == {"w0": 4.0, "w1": 4.0, "w2": 2.0}
    # three holders: (m - 1) / (4 - 1)
    scores = policy.scores(WORKERS, holding(w0=1, w1=2, w2=4), load)
    assert scores == pytest.approx({"w0": 2.0, "w1": 2.0 + 2 / 3, "w2": 4.0})


def test_precise_prefix_ignores_holders_that_are_not_candidates():
    policy = PrecisePrefix()
    scores = policy.scores(["w0", "w1"], holding(w0=1, w1=2, w2=4), cluster())
    assert scores == {"w0": 2.0, "w1": 4.0}  # over w0 and w1 only: w1 is the longest


def test_precise_prefix_queue_and_kv_usage_terms():
    policy = PrecisePrefix()
    load = cluster(w0={"waiting": 0, "usage": 0.5}, w1={"waiting": 2, "usage": 0.0}, w2={"waiting": 4, "usage": 0.25})
    # queue: (4 - q) / 4 = 1, 0.5, 0; kv: 0.5, 1, 0.75
    assert policy.scores(WORKERS, {}, load) == {"w0": 1.5, "w1": 1.5, "w2": 0.75}
    decision = policy.choose_prefill(request(), WORKERS, {}, load)
    assert (decision.worker, decision.reason) == ("w0", "max_score")  # a tie: the earliest
    load.add_inflight("x", "w0", requests=2)  # the router's placement joins w0's queue: 2, 2, 4
    assert policy.scores(WORKERS, {}, load) == {"w0": 1.5, "w1": 2.0, "w2": 0.75}


def test_precise_prefix_equal_queues_all_score_one():
    policy = PrecisePrefix()
    load = cluster(w0={"waiting": 3}, w1={"waiting": 3}, w2={"waiting": 3})
    assert policy.scores(WORKERS, {}, load) == {"w0": 2.0, "w1": 2.0, "w2": 2.0}


def test_precise_prefix_cache_weight_against_load():
    # the holder has the longest queue and a full cache: 2 + 0 + 0 = 2 ties an idle worker's 0 + 1 + 1
    policy = PrecisePrefix()
    load = cluster(w0={"waiting": 0}, w1={"waiting": 5, "usage": 1.0, "free": 0})
    decision = policy.choose_prefill(request(), ["w1", "w0"], holding(w1=2), load)
    assert (decision.worker, decision.reason) == ("w1", "cache_hit")
    decision = policy.choose_prefill(request(), ["w0", "w1"], holding(w1=2), load)
    assert (decision.worker, decision.reason) == ("w0", "max_score")
    # a heavier cache weight settles it for the holder
    heavier = PrecisePrefix(PrecisePrefixConfig(prefix_weight=3.0))
    assert heavier.choose_prefill(request(), ["w0", "w1"], holding(w1=2), load).worker == "w1"


# ---------------------------------------------------------------------------------------------- registration


@pytest.mark.parametrize(
    "policy, second",
    [
        # b's prompt is claimed on p0 by a, whose prefill is still queued there: Dynamo's cost charges
        # p0 a's 16 tokens and 5 KV blocks (8 + 5 = 13 against p1's 8) and sends b to the idle worker
        ("kv_overlap", ("p1", "least_cost", 0)),
        # llm-d: p0 holds the prefix (2) but has the longer queue (0): 2 + 1 + 0 = 3 against p1's 0 + 1 + 1
        ("precise_prefix", ("p0", "cache_hit", 12)),
    ],
)
def test_the_router_places_with_the_baselines(policy, second):
    assert policy in POLICIES
    router = Router(["p0", "p1"], ["p0", "p1"], policy, BLOCK, clock=Clock())
    first = router.place(RouteRequest("a", token_ids=PROMPT, max_tokens=4))
    assert first.prefill_worker == "p0"
    placed = router.place(RouteRequest("b", token_ids=PROMPT, max_tokens=4))
    assert (placed.prefill_worker, placed.reason, placed.predicted_hit_tokens) == second
    assert sum(n for (name, _), n in router.stats().decisions.items() if name == policy) == 2


def test_the_cli_offers_every_policy():
    from services.cli import build_parser

    for policy in POLICIES:
        assert build_parser().parse_args(["serve", "--router-policy", policy]).router_policy == policy
