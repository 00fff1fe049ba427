"""The GPU fast path (Triton decode kernel, SDPA prefill, CUDA graphs) against the plain-torch reference."""

import random

import pytest
import torch

from services.engine import LLM, SamplingParams
from tests.conftest import TINY_MODEL_VARIANTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 900) for _ in range(n)]} for n in lengths]


def greedy(llm, batch, max_tokens=16, logprobs=None):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    return llm.generate(batch, params)


@pytest.mark.parametrize("variant", sorted(TINY_MODEL_VARIANTS))
def test_fast_path_matches_reference_in_float32(tiny_model_dirs, variant):
    batch = prompts([3, 17, 40, 70, 9, 130])
    common = dict(device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=64, num_kv_blocks=256)
    reference = LLM(tiny_model_dirs[variant], attention_backend="reference", enable_cuda_graphs=False, **common)
    fast = LLM(tiny_model_dirs[variant], attention_backend="triton", enable_cuda_graphs=True, **common)
    ref_out = greedy(reference, batch, logprobs=3)
    fast_out = greedy(fast, batch, logprobs=3)
    for r, f in zip(ref_out, fast_out):
        assert f.outputs[0].token_ids == r.outputs[0].token_ids
        for r_step, f_step in zip(r.outputs[0].logprobs, f.outputs[0].logprobs):
            for tid, lp in r_step.items():
                assert f_step[tid].logprob == pytest.approx(lp.logprob, abs=2e-3)
    assert fast.engine.num_free_blocks() == fast.engine.num_usable_blocks()


def test_fast_path_with_prefix_hits_and_preemption_matches_reference(llama_dir):
    shared = prompts([48], seed=1)[0]["prompt_token_ids"]
    batch = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in prompts([5, 20, 33, 2], seed=2)]
    common = dict(
        device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=48, num_kv_blocks=14, max_model_len=200
    )
    reference = LLM(llama_dir, attention_backend="reference", enable_cuda_graphs=False, **common)
    fast = LLM(llama_dir, attention_backend="triton", **common)
    expected = [o.outputs[0].token_ids for o in greedy(reference, batch, max_tokens=40)]
    assert [o.outputs[0].token_ids for o in greedy(fast, batch, max_tokens=40)] == expected
    assert fast.engine.scheduler_stats().num_preemptions > 0
    assert fast.engine.scheduler_stats().prefix_cache_hit_tokens > 0
    assert fast.engine.num_free_blocks() == fast.engine.num_usable_blocks()


def test_bfloat16_fast_path_tracks_transformers(llama_dir):
    from transformers import AutoModelForCausalLM

    batch = prompts([12, 30], seed=3)
    llm = LLM(llama_dir, device="cuda", dtype="bfloat16")
    out = greedy(llm, batch, max_tokens=8, logprobs=1)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda().eval()
    for prompt, o in zip(batch, out):
        ids = prompt["prompt_token_ids"] + o.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids], device="cuda")).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)[len(prompt["prompt_token_ids"]) - 1 : -1]
        chosen = torch.tensor(o.outputs[0].token_ids, device="cuda")
        # bf16: every token we chose is (near) the top of transformers' distribution at that step
        gap = ref.max(dim=-1).values - ref.gather(1, chosen[:, None]).squeeze(1)
        assert gap.max().item() < 0.1


def test_mixed_step_graphs_equal_the_eager_path(llama_dir):
    """Steps mixing prefill chunks (chunked, after prefix hits, recomputing after preemption) with
    decodes: captured mixed graphs give the eager varlen path's and the plain SDPA path's tokens."""
    shared = prompts([40], seed=4)[0]["prompt_token_ids"]
    batch = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in prompts([5, 70, 33, 2, 90, 17], seed=5)]
    common = dict(
        device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=96, num_kv_blocks=24, max_model_len=200
    )
    graphs = LLM(llama_dir, **common)
    varlen = LLM(llama_dir, mixed_cuda_graph_max_tokens=0, **common)
    sdpa = LLM(llama_dir, mixed_cuda_graph_max_tokens=0, varlen_prefill_attention=False, **common)
    expected = [o.outputs[0].token_ids for o in greedy(sdpa, batch, max_tokens=40)]
    assert [o.outputs[0].token_ids for o in greedy(varlen, batch, max_tokens=40)] == expected
    assert [o.outputs[0].token_ids for o in greedy(graphs, batch, max_tokens=40)] == expected
    paths = graphs.engine.runner.steps_by_path
    assert paths["mixed_graph"] > 0 and paths["decode_graph"] > 0, paths
    assert varlen.engine.runner.steps_by_path["mixed_graph"] == 0
    stats = graphs.engine.scheduler_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    for llm in (graphs, varlen, sdpa):
        assert llm.engine.num_free_blocks() == llm.engine.num_usable_blocks()


def test_mixed_step_graphs_keep_seeded_sampling_and_logprobs(llama_dir):
    batch = prompts([3, 50, 20, 64], seed=6)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True, logprobs=2)
    common = dict(device="cuda", dtype="float32", max_num_batched_tokens=64)
    graphs = LLM(llama_dir, **common).generate(batch, params)
    eager = LLM(llama_dir, mixed_cuda_graph_max_tokens=0, varlen_prefill_attention=False, **common).generate(
        batch, params
    )
    for g, e in zip(graphs, eager):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for g_step, e_step in zip(g.outputs[0].logprobs, e.outputs[0].logprobs):
            for tid, lp in e_step.items():
                assert g_step[tid].logprob == pytest.approx(lp.logprob, abs=1e-3)


def test_asynchronous_scheduling_gives_the_plain_order_s_tokens_on_the_gpu(llama_dir):
    """Decode inputs gathered from the step in flight on the device, through decode and mixed graphs,
    with chunked prefill, prefix hits, preemption, stop strings and seeded sampling."""
    shared = prompts([40], seed=8)[0]["prompt_token_ids"]
    batch = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in prompts([5, 70, 33, 2, 90, 17], seed=9)]
    common = dict(
        device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=96, num_kv_blocks=24, max_model_len=200
    )
    plain = LLM(llama_dir, overlap_outputs=False, **common)
    fast = LLM(llama_dir, async_scheduling=True, **common)
    for params in (
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=30, stop=["a"], logprobs=2),
    ):
        expected = plain.generate(batch, params)
        got = fast.generate(batch, params)
        for e, g in zip(expected, got):
            assert (g.outputs[0].token_ids, g.outputs[0].text) == (e.outputs[0].token_ids, e.outputs[0].text)
    assert fast.engine.scheduler_stats().num_preemptions > 0
    assert fast.engine.num_free_blocks() == fast.engine.num_usable_blocks()


def test_prompt_logprobs_through_graphs_equal_transformers(llama_dir):
    """Prompt logprobs taken from the hidden states of chunks that ran in mixed-step graphs, with
    asynchronous scheduling, equal transformers' log_softmax, as the eager reference path's do."""
    from transformers import AutoModelForCausalLM

    batch = prompts([5, 70, 33, 130], seed=10)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)
    common = dict(device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=64, num_kv_blocks=64)
    fast = LLM(llama_dir, async_scheduling=True, **common)
    reference = LLM(llama_dir, attention_backend="reference", enable_cuda_graphs=False, **common)
    got, expected = fast.generate(batch, params), reference.generate(batch, params)
    assert fast.engine.runner.steps_by_path["mixed_graph"] > 0
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).cuda().eval()
    for prompt, g, e in zip(batch, got, expected):
        ids = prompt["prompt_token_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids], device="cuda")).logits[0].float(), dim=-1)
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(ids)
        for position in range(1, len(ids)):
            token_id, row = ids[position], ref[position - 1]
            for out in (g, e):
                entry = out.prompt_logprobs[position]
                assert next(iter(entry)) == token_id
                assert entry[token_id].logprob == pytest.approx(row[token_id].item(), abs=2e-3)
            assert set(g.prompt_logprobs[position]) == set(e.prompt_logprobs[position])
