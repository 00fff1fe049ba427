"""The host KV tier under the prefix cache (services/engine/kv_cache/host_tier.py): evicted blocks go to
host memory, a later hit restores them instead of recomputing, with unchanged greedy output."""

import math

import msgspec
import pytest
import torch

from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from services.engine import LLM, SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.kv_cache.host_tier import HostBlockPool, HostKVBuffer, KVCopyPlan
from services.engine.kv_cache.manager import KVCacheManager
from services.engine.scheduler import Scheduler
from services.workers.metrics import _scheduler_families
from tests.unit.test_control import ENGINE_STATS
from tests.unit.test_engine_vs_transformers import engine_greedy, hf_greedy, random_prompts
from tests.unit.test_kv_cache import make_request

BLOCK = 4
HOST_GIB = 2**-10  # 1 MiB: hundreds of the tiny model's blocks of 8 tokens


# ------------------------------------------------------------------ the host block pool


def test_host_pool_evicts_least_recently_used_and_says_so_with_medium_cpu():
    events: list[KVEvent] = []
    host = HostBlockPool(2, BLOCK, events.append)
    assert host.store(10, None, (1, 2, 3, 4), None) == 0
    assert host.store(11, 10, (5, 6, 7, 8), ["salt"]) == 1
    assert host.store(10, None, (1, 2, 3, 4), None) is None  # held already: only marked used
    assert host.store(12, 11, (9, 9, 9, 9), None) == 1  # full: 11 is the least recently used
    assert events == [
        BlockStored([10], None, [1, 2, 3, 4], BLOCK, medium="CPU"),
        BlockStored([11], 10, [5, 6, 7, 8], BLOCK, medium="CPU", extra_keys=[["salt"]]),
        BlockRemoved([11], medium="CPU"),
        BlockStored([12], 11, [9, 9, 9, 9], BLOCK, medium="CPU"),
    ]
    assert host.lookup(10, (1, 2, 3, 4)) is not None
    assert host.lookup(10, (1, 2, 3, 5)) is None  # tokens re-checked
    assert host.num_used_blocks == 2 and host.usage() == 1.0


def test_pinned_host_blocks_are_not_evicted():
    host = HostBlockPool(2, BLOCK, lambda event: None)
    host.store(10, None, (1,) * BLOCK, None)
    host.store(11, None, (2,) * BLOCK, None)
    block = host.lookup(10, (1,) * BLOCK)
    assert block is not None
    host.pin([block])
    host.touch(11)  # 10 is the least recently used, but pinned
    assert host.store(12, None, (3,) * BLOCK, None) == 1 and host.contains(10) and not host.contains(11)
    host.pin([host.lookup(12, (3,) * BLOCK)])  # type: ignore[list-item]
    assert host.store(13, None, (4,) * BLOCK, None) is None  # every slot pinned: the block is dropped
    host.unpin([block])
    assert host.store(13, None, (4,) * BLOCK, None) == 0


def test_host_buffer_copies_blocks_out_and_back():
    kv_cache = torch.arange(2 * 2 * 6 * BLOCK * 3, dtype=torch.float32).reshape(2, 2, 6, BLOCK, 1, 3)
    buffer = HostKVBuffer(4, kv_cache[:, :, 0].shape, torch.float32, torch.device("cpu"))
    original = kv_cache.clone()
    # slots 0, 1 (one run) and 3; then block 2 is restored into block 5 and block 4 into block 1
    buffer.issue(kv_cache, KVCopyPlan(offloads={0: 2, 1: 4, 3: 1}))
    assert torch.equal(buffer.blocks[1], original[:, :, 4]) and torch.equal(buffer.blocks[3], original[:, :, 1])
    buffer.issue(kv_cache, KVCopyPlan(onloads=[(0, 5), (1, 1)]))
    assert torch.equal(kv_cache[:, :, 5], original[:, :, 2]) and torch.equal(kv_cache[:, :, 1], original[:, :, 4])


def test_offloads_of_a_plan_go_before_its_onloads():
    """A device block evicted and reused for a restore in one plan is saved before it is overwritten."""
    kv_cache = torch.randn(1, 2, 3, BLOCK, 1, 2)
    buffer = HostKVBuffer(2, kv_cache[:, :, 0].shape, torch.float32, torch.device("cpu"))
    buffer.blocks[1] = torch.randn(*buffer.blocks.shape[1:])
    old_block, restored = kv_cache[:, :, 2].clone(), buffer.blocks[1].clone()
    buffer.issue(kv_cache, KVCopyPlan(offloads={0: 2}, onloads=[(1, 2)]))
    assert torch.equal(buffer.blocks[0], old_block) and torch.equal(kv_cache[:, :, 2], restored)


# ------------------------------------------------------------------ the manager: exact blocks and slots


def test_evicted_blocks_go_to_the_host_and_a_hit_restores_them_into_fresh_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, num_host_blocks=4)  # 3 usable device blocks
    a = make_request("a", range(12))  # 3 full blocks
    assert kv.allocate_slots(a, 12)
    kv.free("a")  # tail first: the free queue is [3, 2, 1]
    kv.pool.take_events()
    b = make_request("b", range(100, 112))
    assert kv.allocate_slots(b, 12)  # evicts 3, 2, 1: to host slots 0, 1, 2
    plan = kv.take_copy_plan()
    assert plan.offloads == {0: 3, 1: 2, 2: 1} and plan.onloads == []
    events = kv.pool.take_events()
    stored = BlockStored([a.block_hashes[2]], a.block_hashes[1], list(range(8, 12)), BLOCK, medium="CPU")
    assert events[:2] == [BlockRemoved([a.block_hashes[2]]), stored]
    kv.free("b")  # [3, 2, 1] again, now holding b
    again = make_request("a2", [*range(12), 99])  # a's 12 tokens and one more: all 3 blocks may hit
    assert kv.get_computed_blocks(again) == []
    hits = kv.get_host_hits(again, 0)
    assert [h.slot for h in hits] == [2, 1, 0]
    assert not kv.allocate_slots(again, 1, [], hits)  # 3 restored + 1 for the new token: 4 > 3 blocks
    assert kv.block_ids("a2") == [] and kv.host_hit_tokens == 0 and not kv.take_copy_plan()
    assert kv.host is not None and kv.host.num_pinned_blocks == 0


def test_restore_allocates_fresh_blocks_and_plans_onloads():
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK, num_host_blocks=4)  # 5 usable device blocks
    a = make_request("a", range(8))
    assert kv.allocate_slots(a, 8)  # blocks 1, 2
    kv.free("a")  # queue [3, 4, 5, 2, 1]
    b = make_request("b", range(100, 120))  # 5 blocks: evicts 2 and 1 last
    assert kv.allocate_slots(b, 20)
    assert kv.take_copy_plan().offloads == {0: 2, 1: 1}
    kv.free("b")  # b held [3, 4, 5, 2, 1]: the queue is [1, 2, 5, 4, 3] (tail first)
    again = make_request("a2", [*range(8), 7, 7])
    hits = kv.get_host_hits(again, len(kv.get_computed_blocks(again)))
    assert [h.slot for h in hits] == [1, 0]
    assert kv.allocate_slots(again, 2, [], hits)
    assert kv.block_ids("a2") == [1, 2, 5]  # two fresh blocks restored, one for the new tokens
    plan = kv.take_copy_plan()
    assert plan.onloads == [(1, 1), (0, 2)]
    # evicting b's blocks 1, 2, 5 saved them to slots 2, 3, then 2 again (slots 0, 1 are pinned by the
    # restore; 2 was the least recently used): block 1's copy is dropped, block 2's goes before its onload
    assert plan.offloads == {2: 5, 3: 2}
    assert kv.host_hit_tokens == 8 and kv.host is not None and kv.host.num_pinned_blocks == 0
    # restored blocks are cached on the device again: a third request shares them
    third = make_request("a3", [*range(8), 1, 2, 3])
    assert [b.block_id for b in kv.get_computed_blocks(third)] == [1, 2]


def test_no_device_room_for_restored_blocks_recomputes_them():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, num_host_blocks=4)  # 3 usable device blocks
    a = make_request("a", range(12))
    assert kv.allocate_slots(a, 12)
    kv.free("a")
    b = make_request("b", range(100, 112))
    assert kv.allocate_slots(b, 12)
    kv.take_copy_plan()
    kv.free("b")
    scheduler = Scheduler(kv, max_num_batched_tokens=BLOCK, max_num_seqs=4)
    again = make_request("a2", [*range(12), 99])
    scheduler.add(again)
    batch = scheduler.schedule()  # 3 restored + 1 block of 4 new tokens do not fit 3 blocks: recompute
    assert batch.requests == [again] and batch.num_new_tokens == [BLOCK]
    assert again.num_computed_tokens == 0 and kv.host_hit_tokens == 0
    assert kv.take_copy_plan().onloads == []


def test_reset_clears_both_tiers():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, num_host_blocks=4)
    a = make_request("a", range(12))
    assert kv.allocate_slots(a, 12)
    kv.free("a")
    assert kv.allocate_slots(make_request("b", range(100, 112)), 12)
    kv.take_copy_plan()
    assert not kv.reset_prefix_cache()  # b holds blocks
    kv.free("b")
    assert kv.host is not None and kv.host.num_used_blocks == 3
    assert kv.reset_prefix_cache()
    assert kv.host.num_used_blocks == 0 and isinstance(kv.pool.take_events()[-1], AllBlocksCleared)
    assert kv.get_host_hits(make_request("a2", [*range(12), 1]), 0) == []


# ------------------------------------------------------------------ the engine


def _tiny_llm(model_dir, **overrides):
    # 7 usable blocks of 8 tokens: a 48-token prompt and its output fill the pool alone
    return LLM(model_dir, block_size=8, num_kv_blocks=8, max_num_batched_tokens=64, **overrides)


def test_a_prefix_evicted_to_the_host_is_restored_not_recomputed_with_the_same_output(llama_dir):
    first, second = random_prompts([40, 48], seed=11)
    with_host, without = _tiny_llm(llama_dir, kv_offloading_size=HOST_GIB), _tiny_llm(llama_dir)
    outputs = {}
    for name, llm in (("host", with_host), ("none", without)):
        engine_greedy(llm, [first], max_tokens=4)
        engine_greedy(llm, [second], max_tokens=4)  # evicts every block of the first prompt
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        [out] = llm.generate([{"prompt_token_ids": first}], params)
        outputs[name] = out
    stats = with_host.engine.scheduler_stats()
    # (40 - 1) // 8 = 4 full blocks may hit (the last prompt token is computed): all from the host
    assert outputs["host"].num_cached_tokens == 32 and stats.host_hit_tokens == 32
    assert outputs["none"].num_cached_tokens == 0 and without.engine.scheduler_stats().host_hit_tokens == 0
    assert outputs["host"].outputs[0].token_ids == outputs["none"].outputs[0].token_ids
    assert outputs["host"].outputs[0].token_ids == hf_greedy(llama_dir, [first])[0]
    bytes_per_block = with_host.engine.runner.kv_bytes_per_block
    assert stats.kv_onloaded_bytes == 4 * bytes_per_block
    assert stats.kv_offloaded_bytes >= 11 * bytes_per_block  # the prompts' full blocks: 5 and 6 at least
    host_tier = stats.kv_tiers[1]
    assert host_tier.tier == "host" and host_tier.num_total_blocks == with_host.engine.runner.num_host_blocks
    assert stats.kv_host_usage == stats.kv_offloaded_bytes / bytes_per_block / host_tier.num_total_blocks
    _assert_consistent(with_host.engine)


def test_host_tier_events_say_which_tier_holds_a_block(llama_dir):
    llm = _tiny_llm(llama_dir, kv_offloading_size=HOST_GIB)
    first, second = random_prompts([40, 48], seed=12)
    engine_greedy(llm, [first, second], max_tokens=2)
    engine_greedy(llm, [first], max_tokens=2)
    events = llm.engine.kv_cache.pool.take_events()
    host_stored = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU"]
    device_stored = [e.block_hashes[0] for e in events if isinstance(e, BlockStored) and e.medium is None]
    device_removed = [e.block_hashes[0] for e in events if isinstance(e, BlockRemoved) and e.medium is None]
    assert host_stored and not [e for e in events if isinstance(e, BlockRemoved) and e.medium == "CPU"]
    for event in host_stored:  # a block enters the host tier right after the device evicts it
        [block_hash] = event.block_hashes
        index = events.index(event)
        assert events[index - 1] == BlockRemoved([block_hash])
    # the first prompt's restored blocks are stored on the device again
    assert device_stored.count(host_stored[0].block_hashes[0]) == 2 and device_removed


def test_aborts_and_finishes_leave_every_block_free_and_nothing_pinned(llama_dir):
    engine = LLMEngine(
        EngineConfig(
            model=llama_dir, block_size=8, num_kv_blocks=13, max_num_batched_tokens=32, kv_offloading_size=HOST_GIB
        )
    )
    shared = random_prompts([24], seed=13)[0]
    prompts = [shared + tail for tail in random_prompts([9, 17, 5, 30, 12, 20], seed=14)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for round_ in range(3):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{round_}-{i}", {"prompt_token_ids": prompt}, params)
        for step in range(30):
            engine.step()
            if step in (2, 5):  # abort mid-prefill and mid-decode, with a step in flight
                engine.abort_request(f"{round_}-{step}")
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.scheduler_stats().host_hit_tokens > 0
    _assert_consistent(engine)


def test_without_a_host_tier_nothing_changes(llama_dir):
    llm = _tiny_llm(llama_dir)
    first, second = random_prompts([40, 48], seed=15)
    engine_greedy(llm, [first, second, first], max_tokens=4)
    stats = llm.engine.scheduler_stats()
    assert [tier.tier for tier in stats.kv_tiers] == ["device"] and stats.host_kv is None
    assert (stats.host_hit_tokens, stats.kv_offloaded_bytes, stats.kv_onloaded_bytes) == (0, 0, 0)
    assert llm.engine.kv_cache.host is None and llm.engine.runner.host_kv is None
    assert not any(getattr(e, "medium", None) for e in llm.engine.kv_cache.pool.take_events())
    names = {f.name for f in _scheduler_families(stats, ["m", "colocated", "w"])}
    assert not any(name.startswith("tristage:kv_host") for name in names)


def test_the_host_tier_is_sized_by_whole_blocks(llama_dir):
    llm = _tiny_llm(llama_dir, kv_offloading_size=HOST_GIB)
    runner = llm.engine.runner
    assert runner.num_host_blocks == 2**20 // runner.kv_bytes_per_block
    assert runner.host_kv is not None and runner.host_kv.bytes_per_block == runner.kv_bytes_per_block
    with pytest.raises(ValueError, match="holds no KV block"):
        _tiny_llm(llama_dir, kv_offloading_size=1e-9)


@pytest.mark.parametrize("size", [-1.0, math.inf, math.nan, "1"])
def test_offloading_size_must_be_a_finite_non_negative_number(size):
    with pytest.raises(ValueError, match="kv_offloading_size"):
        EngineConfig(device="cpu", kv_offloading_size=size).resolved()


def test_offloading_needs_prefix_caching():
    with pytest.raises(ValueError, match="prefix caching"):
        EngineConfig(device="cpu", kv_offloading_size=1.0, enable_prefix_caching=False).resolved()
    assert EngineConfig(device="cpu", kv_offloading_size=0, enable_prefix_caching=False).resolved()


def test_serve_takes_the_host_tier_size():
    import argparse

    from services.cli import _add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    _add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args(["--kv-offloading-size", "4"])).kv_offloading_size == 4.0
    assert engine_config_from_args(parser.parse_args([])).kv_offloading_size == 0.0


def test_workers_export_the_host_tier():
    assert ENGINE_STATS.scheduler is not None
    from services.common.control import KVTierStats

    tiers = [*ENGINE_STATS.scheduler.kv_tiers, KVTierStats(tier="host", num_free_blocks=30, num_total_blocks=40)]
    scheduler = msgspec.structs.replace(
        ENGINE_STATS.scheduler, kv_tiers=tiers, host_hit_tokens=64, kv_offloaded_bytes=1000, kv_onloaded_bytes=500
    )
    values = {s.name: s.value for f in _scheduler_families(scheduler, ["m", "colocated", "w"]) for s in f.samples}
    assert values["tristage:kv_host_usage_perc"] == 0.25
    assert values["tristage:kv_offloaded_bytes_total"] == 1000
    assert values["tristage:kv_onloaded_bytes_total"] == 500
    assert values["tristage:kv_host_hit_tokens_total"] == 64


def _assert_consistent(engine: LLMEngine) -> None:
    """Every device block free, no host block pinned, no copy left unissued, slot counts adding up."""
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_usable_blocks()
    host = engine.kv_cache.host
    assert host is not None and host.num_pinned_blocks == 0
    assert host.num_used_blocks + host.num_free_blocks == host.num_blocks
    assert not engine.kv_cache.take_copy_plan()
