"""A host-tier hit scores below a device hit: the weight on PrefillRequest, in the policies and in the router."""

import pytest

from services.cli import build_parser
from services.common.block_hash import hash_request_blocks
from services.common.kv_events import BlockStored
from services.router import Router, RouterConfig, RouteRequest, WorkerLoad
from services.router.index import PrefixIndex
from services.router.load import LoadView
from services.router.policies import KvOverlap, Preble, PrecisePrefix, PrefillRequest, PrefixAffinity
from tests.unit.router_fixtures import Clock, tokens

BLOCK = 4
PROMPT = tokens(25)  # 6 full blocks; a hit covers at most 6 (the last token's block is the 7th)


def cache(index, worker, prompt, first, last, medium=None, seq=0):
    """Worker `worker` stores blocks first..last-1 of `prompt` on a tier (medium None: device, "CPU": host)."""
    hashes = hash_request_blocks(prompt, BLOCK)
    parent = hashes[first - 1] if first else None
    event = BlockStored(hashes[first:last], parent, prompt[first * BLOCK : last * BLOCK], BLOCK, medium=medium)
    assert index.apply(worker, seq, [event])


def query(index, prompt, weight=0.75):
    """(PrefillRequest with the index's host match, index_match), as the router builds them."""
    hashes = hash_request_blocks(prompt, BLOCK)
    device, host = index.match_tiers(hashes)
    return PrefillRequest("r", hashes, len(prompt), BLOCK, host_match=host, host_tier_hit_weight=weight), device


def idle(workers, clock=None):
    view = LoadView(clock=clock or Clock())
    for worker in workers:
        view.update(WorkerLoad(worker, "prefill", 0, 0, 0.0, 1000, 0, 0, 1000))
    return view


def test_two_device_blocks_and_two_host_blocks_are_worth_two_plus_three_quarters_of_two():
    index = PrefixIndex()
    cache(index, "w0", PROMPT, 0, 2)
    cache(index, "w0", PROMPT, 2, 4, medium="CPU", seq=1)
    request, device = query(index, PROMPT)
    assert device == {"w0": 2} and request.host_match == {"w0": 2}
    assert request.hit_tokens(device["w0"]) == 2 * BLOCK  # the device hit alone, as before
    assert request.host_hit_tokens("w0", 2) == 2 * BLOCK
    assert request.effective_hit_tokens("w0", 2) == (2 + 0.75 * 2) * BLOCK
    assert request.effective_hit_tokens("w1", 0) == 0
    half, _ = query(index, PROMPT, weight=0.5)
    assert half.effective_hit_tokens("w0", 2) == (2 + 0.5 * 2) * BLOCK


def test_the_host_hit_is_capped_like_any_hit():
    index = PrefixIndex()
    prompt = tokens(24)  # 6 full blocks: the 6th holds the last token, so a hit covers at most 5
    cache(index, "w0", prompt, 0, 4)
    cache(index, "w0", prompt, 4, 6, medium="CPU", seq=1)
    request, device = query(index, prompt)
    assert request.host_match == {"w0": 2} and request.host_hit_tokens("w0", device["w0"]) == BLOCK
    assert request.effective_hit_tokens("w0", device["w0"]) == (4 + 0.75) * BLOCK


@pytest.mark.parametrize("policy", [PrefixAffinity(), KvOverlap(), PrecisePrefix(), Preble()], ids=lambda p: p.name)
def test_a_device_hit_beats_a_host_hit_of_equal_length(policy):
    index = PrefixIndex()
    cache(index, "host", PROMPT, 0, 6, medium="CPU")
    cache(index, "device", PROMPT, 0, 6)
    request, device = query(index, PROMPT)
    candidates = ["host", "device"]  # ties go to the earliest: the host holder, were the hits worth the same
    assert policy.choose_prefill(request, candidates, device, idle(candidates)).worker == "device"
    same, device = query(index, PROMPT, weight=1.0)
    assert policy.choose_prefill(same, candidates, device, idle(candidates)).worker == "host"


def test_a_host_hit_beats_a_miss():
    index = PrefixIndex()
    cache(index, "host", PROMPT, 0, 6, medium="CPU")
    request, device = query(index, PROMPT)
    candidates = ["none", "host"]
    for policy in (PrefixAffinity(), KvOverlap(), PrecisePrefix(), Preble()):
        decision = policy.choose_prefill(request, candidates, device, idle(candidates))
        assert decision.worker == "host", policy.name


def make_router(policy="kv_overlap", **config):
    clock = Clock()
    router = Router(["p0", "p1"], ["p0", "p1"], policy, BLOCK, RouterConfig(**config), clock=clock)
    for worker in ("p0", "p1"):
        router.load.update(WorkerLoad(worker, "colocated", 0, 0, 0.0, 1000, 0, 0, 1000))
    return router


@pytest.mark.parametrize("policy", ["kv_overlap", "preble"])
@pytest.mark.parametrize(("weight", "in_flight"), [(0.75, 25 - 14), (0.5, 25 - 12), (0.0, 25 - 8)])
def test_the_router_counts_host_blocks_at_the_configured_weight(weight, in_flight, policy):
    router = make_router(policy, host_tier_hit_weight=weight)
    cache(router.index, "p1", PROMPT, 0, 2)
    cache(router.index, "p1", PROMPT, 2, 4, medium="CPU", seq=1)
    placement = router.place(RouteRequest("r1", token_ids=PROMPT, max_tokens=4))
    assert placement.prefill_worker == "p1"
    # tokens not recomputed, from either tier, as the worker will report them; 8 of them from the host tier
    assert (placement.predicted_hit_tokens, placement.predicted_host_hit_tokens) == (16, 8)
    assert placement.matched_tokens == 16
    # the in-flight prefill estimate: the prompt net of the hit's worth, 8 + weight * 8 tokens
    assert router.load.get("p1").queued_prefill_tokens == in_flight


def test_host_only_blocks_do_not_count_as_a_device_match_in_the_router():
    router = make_router()
    cache(router.index, "p1", PROMPT, 0, 6, medium="CPU")
    assert router.index.match(hash_request_blocks(PROMPT, BLOCK)) == {}
    placement = router.place(RouteRequest("r1", token_ids=PROMPT, max_tokens=4))
    assert placement.prefill_worker == "p1"
    assert (placement.predicted_hit_tokens, placement.predicted_host_hit_tokens) == (24, 24)
    assert router.load.get("p1").queued_prefill_tokens == 25 - 18


def test_the_weight_is_a_router_tunable_and_a_serve_flag():
    assert RouterConfig().host_tier_hit_weight == 0.75
    with pytest.raises(ValueError, match="host_tier_hit_weight"):
        RouterConfig(host_tier_hit_weight=1.5)
    parser = build_parser()
    assert parser.parse_args(["serve"]).host_tier_hit_weight == 0.75
    assert parser.parse_args(["serve", "--host-tier-hit-weight", "0.5"]).host_tier_hit_weight == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--host-tier-hit-weight", "2"])
