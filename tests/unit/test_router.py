"""The router: decode room, colocated mode, in-flight accounting, encoders, counters, hashing paths."""

import pytest

from services.common.block_hash import MultiModalSpan, hash_request_blocks
from services.common.kv_events import BlockStored
from services.router import (
    POLICIES,
    NoRoomNow,
    NoWorkerAvailable,
    Router,
    RouterConfig,
    RouteRequest,
    WorkerLoad,
)
from services.router.events import EmbeddingStored
from services.router.policies import LeastLoadConfig
from tests.unit.router_fixtures import Clock, tokens

BLOCK = 4


def make_router(policy="least_load", prefill=("p0", "p1"), decode=("d0", "d1"), clock=None, **config):
    return Router(
        list(prefill),
        list(decode),
        policy,
        BLOCK,
        RouterConfig(**config),
        encode_workers=["e0", "e1"],
        clock=clock or Clock(),
    )


def snapshot(
    router, worker, stage="prefill", running=0, waiting=0, kv_usage=0.0, free=1000, queued=0, decoding=0, total=0
):
    router.load.update(WorkerLoad(worker, stage, running, waiting, kv_usage, free, queued, decoding, total))


def cache(router, worker, prompt, num_blocks, seq=0):
    hashes = hash_request_blocks(prompt, BLOCK)[:num_blocks]
    assert router.index.apply(worker, seq, [BlockStored(hashes, None, prompt[: num_blocks * BLOCK], BLOCK)])


def route(request_id, prompt, max_tokens=8, **fields):
    return RouteRequest(request_id, token_ids=prompt, max_tokens=max_tokens, **fields)


def test_registry_names_every_policy_and_refuses_unknown_ones():
    assert sorted(POLICIES) == [
        "kv_overlap",
        "least_load",
        "preble",
        "precise_prefix",
        "prefix_affinity",
        "round_robin",
    ]
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("fastest")
    with pytest.raises(ValueError, match="overlap"):
        make_router(prefill=("a", "b"), decode=("b", "c"))


def test_placement_reports_the_best_match_anywhere_and_the_chosen_workers_hit():
    prompt = tokens(40)  # 10 blocks; at most 9 hit
    router = make_router("prefix_affinity")
    cache(router, "p0", prompt, 3)
    cache(router, "p1", prompt, 6)
    placement = router.place(route("r", prompt))
    assert (placement.prefill_worker, placement.reason, placement.policy) == ("p1", "cache_hit", "prefix_affinity")
    assert (placement.matched_tokens, placement.predicted_hit_tokens) == (24, 24)
    rr = make_router("round_robin")
    cache(rr, "p0", prompt, 3)
    cache(rr, "p1", prompt, 6)
    placement = rr.place(route("r", prompt))
    assert (placement.prefill_worker, placement.matched_tokens, placement.predicted_hit_tokens) == ("p0", 24, 12)


def test_a_fully_cached_prompt_still_predicts_its_last_block_as_computed():
    prompt = tokens(32)
    router = make_router("preble")
    cache(router, "p1", prompt, 8)
    placement = router.place(route("r", prompt))
    assert (placement.prefill_worker, placement.reason, placement.predicted_hit_tokens) == ("p1", "exploit", 28)


def test_round_robin_through_the_router():
    router = make_router("round_robin", prefill=("p0", "p1", "p2"))
    assert [router.place(route(f"r{i}", tokens(8))).prefill_worker for i in range(4)] == ["p0", "p1", "p2", "p0"]


def test_decode_never_goes_to_a_worker_without_room():
    router = make_router()
    # 40 prompt + 24 output tokens = 16 blocks; d0 scores best but has 15 free
    snapshot(router, "d0", "decode", free=15)
    snapshot(router, "d1", "decode", free=16, decoding=10, kv_usage=0.9)
    assert router.place(route("a", tokens(40), max_tokens=24)).decode_worker == "d1"
    snapshot(router, "d1", "decode", free=31)  # a's 16 blocks are still in flight: 15 left
    before = router.stats()
    with pytest.raises(NoRoomNow, match="16 free KV blocks"):  # the gateway queues it until room is reported
        router.place(route("b", tokens(40), max_tokens=24))
    assert router.stats() == before and router.load.num_inflight() == 1  # a refusal records nothing


def test_a_request_no_decode_worker_could_ever_hold_goes_to_the_largest():
    router = make_router()
    # 40 prompt + 24 output tokens = 16 blocks; neither worker has 16 blocks even when empty
    snapshot(router, "d0", "decode", free=10, total=12)
    snapshot(router, "d1", "decode", free=2, total=14)
    assert router.place(route("a", tokens(40), max_tokens=24)).decode_worker == "d1"
    snapshot(router, "d1", "decode", free=2, total=16)  # d1 could hold it once requests finish: wait for that
    with pytest.raises(NoRoomNow):
        router.place(route("b", tokens(40), max_tokens=24))


def test_decode_score_weighs_decoding_sequences_and_kv_usage():
    router = make_router(decode_kv_usage_weight=32.0)
    snapshot(router, "d0", "decode", decoding=4, kv_usage=0.5)  # 4 + 16 = 20
    snapshot(router, "d1", "decode", decoding=10, kv_usage=0.25)  # 10 + 8 = 18
    picks = [router.place(route(f"r{i}", tokens(8))).decode_worker for i in range(3)]
    assert picks == ["d1", "d1", "d0"]  # 18, then 19 (one in flight), then 20 against 20: the earlier


def test_default_expected_output_sizes_the_room_when_max_tokens_is_absent():
    router = make_router(default_expected_output_tokens=256)
    snapshot(router, "d0", "decode", free=66)  # 8 + 256 tokens = 66 blocks: fits exactly
    snapshot(router, "d1", "decode", free=65)
    assert router.place(RouteRequest("r", token_ids=tokens(8))).decode_worker == "d0"


def test_placements_between_snapshots_see_each_other_until_the_worker_counts_them():
    clock = Clock()
    router = make_router("least_load", clock=clock, least_load=LeastLoadConfig(running_weight=64))
    assert router.place(route("a", tokens(40))).prefill_worker == "p0"
    assert router.place(route("b", tokens(40, 1))).prefill_worker == "p1"  # p0 has 40 tokens in flight
    assert router.load.get("p0").queued_prefill_tokens == 40 and router.load.get("p0").num_waiting == 1
    router.acknowledge("a", "p0")
    assert router.load.get("p0").queued_prefill_tokens == 40  # still counted until p0's next snapshot
    snapshot(router, "p0", queued=40)
    assert router.load.get("p0").queued_prefill_tokens == 40  # now counted once, by the snapshot
    snapshot(router, "p1", queued=0)  # b not acknowledged: its estimate stays
    assert router.load.get("p1").queued_prefill_tokens == 40
    clock.now += 2.01  # past inflight_ttl_s
    assert router.load.get("p1").queued_prefill_tokens == 0
    router.place(route("c", tokens(40, 2)))
    router.release("c")
    assert router.load.num_inflight() == 0


def test_colocated_decode_is_the_prefill_worker_and_room_comes_first():
    prompt = tokens(40)
    router = make_router("prefix_affinity", prefill=("w0", "w1"), decode=("w0", "w1"))
    assert router.colocated
    cache(router, "w0", prompt, 9)
    snapshot(router, "w0", "colocated", free=5)  # needs 12 blocks: the cache holder has no room
    snapshot(router, "w1", "colocated", free=100)
    placement = router.place(route("r", prompt))
    assert (placement.prefill_worker, placement.decode_worker, placement.reason) == ("w1", "w1", "least_load")
    snapshot(router, "w1", "colocated", free=5)  # nobody has room: the engine queues, the policy chooses
    placement = router.place(route("s", prompt))
    assert (placement.prefill_worker, placement.decode_worker, placement.reason) == ("w0", "w0", "cache_hit")
    assert router.load.get("w0").num_decoding == 1


def test_token_ids_and_block_hashes_place_alike_and_the_salt_separates_tenants():
    prompt = tokens(40)
    router = make_router("prefix_affinity")
    salted = hash_request_blocks(prompt, BLOCK, cache_salt="t1")
    router.index.apply("p1", 0, [BlockStored(salted, None, prompt, BLOCK)])
    by_tokens = router.place(route("a", prompt, cache_salt="t1"))
    by_hashes = router.place(RouteRequest("b", block_hashes=salted, num_prompt_tokens=40, max_tokens=8))
    assert by_tokens.prefill_worker == by_hashes.prefill_worker == "p1"
    assert by_tokens.matched_tokens == by_hashes.matched_tokens == 36
    assert router.place(route("c", prompt)).matched_tokens == 0  # unsalted: another tenant's cache
    assert router.place(route("d", prompt, cache_salt="t2")).matched_tokens == 0


def test_image_spans_enter_the_hashes():
    prompt = [7] * 16
    router = make_router("prefix_affinity")
    spans_a = [MultiModalSpan("img-a", 4, 8)]
    hashes = hash_request_blocks(prompt, BLOCK, mm_spans=spans_a)
    router.index.apply("p0", 0, [BlockStored(hashes, None, prompt, BLOCK)])
    assert router.place(route("a", prompt, mm_spans=spans_a)).matched_tokens == 12
    other = router.place(route("b", prompt, mm_spans=[MultiModalSpan("img-b", 4, 8)]))
    assert other.matched_tokens == 4  # block 0 holds no image; blocks 1, 2 hold the other image


def test_bad_requests_are_refused():
    router = make_router()
    with pytest.raises(ValueError, match="neither"):
        router.place(RouteRequest("r"))
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        router.place(RouteRequest("r", block_hashes=[1, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        router.place(RouteRequest("r", block_hashes=[1, 2], num_prompt_tokens=7))


def test_encoders_go_where_the_embedding_is_else_to_the_least_loaded():
    router = make_router()
    router.content_index.apply("e1", 0, [EmbeddingStored(["img-a"])])
    snapshot(router, "e0", "encode", running=1)
    snapshot(router, "e1", "encode", running=3)
    placement = router.place(route("r", tokens(8), image_hashes=["img-a", "img-b", "img-a", "img-c"]))
    # img-b: e0 (1 running) over e1 (3 + img-a in flight); img-c: e0 has 1 + 1, e1 3 + 1
    assert placement.encode_workers == ("e1", "e0", "e1", "e0")
    assert router.stats().decisions[("encode", "embedding_hit")] == 1
    assert router.stats().decisions[("encode", "least_load")] == 2
    no_encoders = Router(["p0"], ["d0"], "least_load", BLOCK)
    with pytest.raises(NoWorkerAvailable, match="encode"):
        no_encoders.place(route("r", tokens(8), image_hashes=["img-a"]))


def test_the_images_of_one_request_spread_over_idle_encoders_one_each_then_by_images_queued():
    router = Router(["p0"], ["d0"], "least_load", BLOCK, encode_workers=["e0", "e1", "e2"], clock=Clock())
    # idle encoders: each image sees the ones placed before it (in flight), so three images land one each
    first = router.place(route("r1", tokens(8), image_hashes=["a", "b", "c"]))
    assert first.encode_workers == ("e0", "e1", "e2")
    assert [router.load.get(e).num_waiting for e in ("e0", "e1", "e2")] == [1, 1, 1]
    # load counts images: e0 has 3 queued and 1 in the tower, e1 one in the tower, e2 idle
    for worker, running, waiting in [("e0", 1, 3), ("e1", 1, 0), ("e2", 0, 0)]:
        router.acknowledge("r1", worker)
        snapshot(router, worker, "encode", running=running, waiting=waiting)
    second = router.place(route("r2", tokens(8, family=1), image_hashes=["d", "e", "f", "g"]))
    # d: e2 (0 against 1 and 4); e: e1 and e2 at 1, a tie goes in the pool's order; f: e2 (1 against 2);
    # g: e1 and e2 at 2, e1
    assert second.encode_workers == ("e2", "e1", "e2", "e1")
    assert router.stats().decisions[("encode", "least_load")] == 7


def test_counters_for_decisions_hits_and_imbalance():
    prompt = tokens(40)
    router = make_router("preble")
    cache(router, "p1", prompt, 9)
    assert router.stats().load_imbalance == 1.0  # idle
    a = router.place(route("a", prompt))  # exploit p1: 36 predicted, 4 tokens in flight
    b = router.place(route("b", tokens(40, 1)))  # explore: p0 costs 40, p1 40 + a's 4 tokens in flight
    assert (a.prefill_worker, a.reason, b.prefill_worker, b.reason) == ("p1", "exploit", "p0", "explore")
    router.observe_hit("a", "p1", 32)
    router.observe_hit("b", "p1", 99)  # b ran on p0: not comparable
    router.observe_hit("zzz", "p0", 7)  # unknown
    stats = router.stats()
    assert stats.decisions == {("preble", "exploit"): 1, ("preble", "explore"): 1}
    assert (stats.num_placements, stats.num_prompt_tokens, stats.predicted_hit_tokens) == (2, 80, 36)
    assert (stats.num_observed, stats.predicted_hit_tokens_observed, stats.observed_hit_tokens) == (1, 36, 32)
    assert stats.load_imbalance == 40 / 4
    snapshot(router, "p0", queued=300)
    snapshot(router, "p1", queued=100, running=1)
    assert router.load_imbalance() == (300 + 40) / (100 + 64 + 4)


def test_remove_worker_takes_it_out_of_its_pool_index_and_load():
    prompt = tokens(40)
    router = make_router("prefix_affinity")
    cache(router, "p1", prompt, 9)
    router.place(route("a", prompt))
    router.remove_worker("p1")
    assert router.prefill_workers == ["p0"]
    assert router.index.match(hash_request_blocks(prompt, BLOCK)) == {}
    placement = router.place(route("b", prompt))
    assert (placement.prefill_worker, placement.matched_tokens) == ("p0", 0)
    router.remove_worker("p0")  # no prefill worker left: the decode workers serve whole (see below)
    assert router.place(route("c", prompt)).reason == "fallback_whole"


def test_a_missing_stage_places_requests_whole_on_the_survivors():
    prompt = tokens(40)
    router = make_router("preble")
    cache(router, "d1", prompt, 9)  # decode workers publish KV events too
    snapshot(router, "d0", "decode", running=0)
    snapshot(router, "d1", "decode", running=3)
    router.remove_worker("p0")
    router.remove_worker("p1")
    # the longest prefix wins over load among the survivors with room
    placement = router.place(route("a", prompt))
    assert (placement.prefill_worker, placement.decode_worker, placement.reason) == ("d1", "d1", "fallback_whole")
    assert (placement.matched_tokens, placement.predicted_hit_tokens) == (36, 36)
    # the whole request's load on the one worker: the prompt's uncached 4 tokens, a waiting request,
    # ceil((40 + 8) / 4) = 12 KV blocks and a decoding sequence
    assert router.load.get("d1") == WorkerLoad("d1", "decode", 3, 1, 0.0, 988, 4, 1)
    placement = router.place(route("b", tokens(40, family=1)))  # no hit anywhere: the least loaded
    assert (placement.prefill_worker, placement.decode_worker) == ("d0", "d0")
    snapshot(router, "d0", "decode", free=3)  # no room on d0: d1 even though it is busier
    assert router.place(route("c", tokens(8, family=2))).prefill_worker == "d1"
    assert router.stats().decisions[("preble", "fallback_whole")] == 3

    # the other way round: prefill workers serve whole while no decode worker is up
    router = make_router("round_robin")
    router.remove_worker("d0")
    router.remove_worker("d1")
    snapshot(router, "p0", running=2)
    placement = router.place(route("d", prompt))
    assert (placement.prefill_worker, placement.decode_worker, placement.reason) == ("p1", "p1", "fallback_whole")
    router.add_worker("d0", "decode")  # the stage is back: disaggregated again, by the policy
    placement = router.place(route("e", prompt))
    assert (placement.decode_worker, placement.reason) == ("d0", "round_robin")
    for worker in ("p0", "p1", "d0"):
        router.remove_worker(worker)
    with pytest.raises(NoWorkerAvailable, match="no prefill or decode worker"):
        router.place(route("f", prompt))


def test_a_suspended_worker_is_skipped_but_not_forgotten():
    prompt = tokens(40)
    router = make_router("prefix_affinity")
    cache(router, "p1", prompt, 9)
    router.suspend_worker("p1")  # quiet: its stage's other worker takes its placements, cache or not
    assert router.place(route("a", prompt)).prefill_worker == "p0"
    router.suspend_worker("p0")  # the whole stage quiet: the decode workers serve whole
    assert router.place(route("b", prompt)).reason == "fallback_whole"
    router.suspend_worker("d0")
    router.suspend_worker("d1")  # everything quiet: used anyway (a queue, not a refusal)
    assert router.place(route("c", prompt)).prefill_worker == "p1"
    for worker in ("p0", "p1", "d0", "d1"):
        router.resume_worker(worker)
    assert router.index.match(hash_request_blocks(prompt, BLOCK))["p1"] >= 9  # its cache entries were kept
    assert router.place(route("d", prompt)).reason == "cache_hit" and not router.suspended


def test_a_refused_placement_leaves_the_policy_untouched():
    router = make_router("round_robin")
    router.encode_workers.clear()
    with pytest.raises(NoWorkerAvailable, match="encode"):
        router.place(route("r", tokens(8), image_hashes=["img-a"]))
    assert router.place(route("s", tokens(8))).prefill_worker == "p0"


def test_worker_load_from_the_gateways_snapshot():
    from services.gateway.backend import WorkerSnapshot

    snap = WorkerSnapshot(
        "d0",
        "decode",
        num_running=5,
        num_waiting=2,
        kv_cache_usage=0.25,
        num_preemptions=0,
        prefix_cache_queried_tokens=100,
        prefix_cache_hit_tokens=40,
    )
    assert WorkerLoad.from_snapshot(snap, num_free_blocks=300) == WorkerLoad("d0", "decode", 5, 2, 0.25, 300, 0, 5)
    prefill = WorkerSnapshot("p0", "prefill", 3, 1, 0.5, 0, 0, 0)
    assert WorkerLoad.from_snapshot(prefill, num_free_blocks=10, queued_prefill_tokens=900).num_decoding == 0
