"""The host KV tier on CUDA (services/engine/kv_cache/host_tier.py): page-locked host memory, copies queued
on the forward's stream with CUDA graphs and asynchronous scheduling, the same greedy tokens as without it."""

import pytest
import torch

from services.engine import LLM
from tests.unit.test_engine_vs_transformers import engine_greedy, hf_greedy, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HOST_GIB = 2**-10  # 1 MiB: far more than the few blocks evicted here


def _tiny_llm(model_dir, **overrides):
    # 7 usable blocks of 16 tokens (112): a 96-token prompt and its output take the whole pool
    common = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=8, max_num_batched_tokens=64)
    return LLM(model_dir, **common, **overrides)  # CUDA graphs and asynchronous scheduling: the defaults


def test_a_prefix_evicted_to_pinned_host_memory_comes_back_with_the_same_tokens(llama_dir):
    first, second = random_prompts([80, 96], seed=21)
    with_host, without = _tiny_llm(llama_dir, kv_offloading_size=HOST_GIB), _tiny_llm(llama_dir)
    host_kv = with_host.engine.runner.host_kv
    assert host_kv is not None and host_kv.blocks.is_pinned()
    outputs = {}
    for name, llm in (("host", with_host), ("none", without)):
        engine_greedy(llm, [first], max_tokens=4)
        engine_greedy(llm, [second], max_tokens=4)  # takes every device block: evicts all of the first's
        outputs[name] = engine_greedy(llm, [first], max_tokens=12)[0]
    stats = with_host.engine.scheduler_stats()
    # (80 - 1) // 16 = 4 full blocks may hit (the last prompt token is computed): all from the host
    assert stats.host_hit_tokens == 64 and stats.kv_onloaded_bytes == 4 * with_host.engine.runner.kv_bytes_per_block
    assert without.engine.scheduler_stats().host_hit_tokens == 0
    assert outputs["host"] == outputs["none"] == hf_greedy(llama_dir, [first], max_tokens=12)[0]
    for llm in (with_host, without):
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.num_free_blocks() == llm.engine.num_usable_blocks()
    host = with_host.engine.kv_cache.host
    assert host is not None and host.num_pinned_blocks == 0 and not with_host.engine.kv_cache.take_copy_plan()
    host_kv.close()  # unregisters the range (after the queued copies)
    assert not host_kv.blocks.is_pinned()
