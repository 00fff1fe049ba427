"""The engine's typed stats: queues, the prefill work queued (waiting and partly prefilled requests),
the decode batch and the KV tier, step by step on a tiny engine."""

import pytest

from services.common.control import CacheConfigInfo, KVTierStats
from services.engine import LLMEngine, SamplingParams


@pytest.fixture
def engine(llama_dir):
    # one running request at a time, 32 tokens a step, 8-token blocks; each step's stops are applied
    # before step() returns (with overlapped outputs they would be at the next call)
    return LLMEngine(
        model=llama_dir,
        block_size=8,
        num_kv_blocks=64,
        max_num_batched_tokens=32,
        max_num_seqs=1,
        overlap_outputs=False,
    )


def load(engine):
    s = engine.scheduler_stats()
    return s.num_running_requests, s.num_waiting_requests, s.num_decoding_requests, s.queued_prefill_tokens


def test_queued_prefill_tokens_count_waiting_and_partly_prefilled_prompts(engine):
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for request_id, num_tokens, start in (("a", 40, 10), ("b", 20, 100), ("c", 12, 200)):
        engine.add_request(request_id, list(range(start, start + num_tokens)), params)
    assert load(engine) == (0, 3, 0, 72)
    engine.step()  # a: 32 of its 40 prompt tokens
    assert load(engine) == (1, 2, 0, 8 + 20 + 12)
    engine.step()  # a: the last 8, and its first token: it decodes
    assert load(engine) == (1, 2, 1, 20 + 12)
    engine.step()  # a: its second token, the last: it finishes (b waits: one running request at most)
    assert load(engine) == (0, 2, 0, 20 + 12)
    engine.step()  # b: its whole prompt and its first token
    assert load(engine) == (1, 1, 1, 12)
    stats = engine.scheduler_stats()
    assert stats.kv_tiers == [
        KVTierStats(
            tier="device", num_free_blocks=engine.num_free_blocks(), num_total_blocks=engine.num_usable_blocks()
        )
    ]
    assert stats.kv_cache_usage == 1 - engine.num_free_blocks() / engine.num_usable_blocks()
    assert stats.prefix_cache_queried_tokens == 40 + 20 and stats.num_preemptions == 0


def test_tokens_per_step_in_vllm_s_buckets_up_to_the_budget_and_the_cache_configuration(engine):
    engine.add_request("a", list(range(10, 50)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    for _ in range(3):  # 32 prompt tokens; the last 8 and the first token; one decode, the last token
        engine.step()
    engine.step()  # nothing left to schedule: not a step that counts
    stats = engine.scheduler_stats()
    assert stats.iteration_tokens is not None
    assert stats.iteration_tokens.buckets == [(1.0, 1), (8.0, 2), (16.0, 2), (32.0, 3), (float("inf"), 3)]
    assert stats.iteration_tokens.sum_tokens == 32 + 8 + 1
    assert stats.cache_config == CacheConfigInfo(
        block_size=8,
        num_gpu_blocks=engine.num_usable_blocks(),
        enable_prefix_caching=True,
        cache_dtype="float32",
        gpu_memory_utilization=0.9,
    )
