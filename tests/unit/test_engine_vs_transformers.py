"""Greedy output of the engine equals transformers' `generate`, token for token, on every family."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine import LLM, SamplingParams
from tests.conftest import TINY_MODEL_VARIANTS

MAX_TOKENS = 12


def random_prompts(lengths, vocab_size=900, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir, prompts, max_tokens=MAX_TOKENS):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        outs.append(ids[0, len(prompt) :].tolist())
    return outs


def engine_greedy(llm, prompts, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm):
    engine = llm.engine
    assert engine.num_free_blocks() == engine.num_usable_blocks()
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("variant", sorted(TINY_MODEL_VARIANTS))
def test_mixed_batch_with_chunked_prefill_matches_transformers(tiny_model_dirs, variant):
    model_dir = tiny_model_dirs[variant]
    prompts = random_prompts([3, 17, 40, 70, 9])
    # a 24-token budget splits the 40- and 70-token prompts into chunks and mixes them with decodes
    llm = LLM(model_dir, block_size=8, max_num_batched_tokens=24, num_kv_blocks=128)
    assert engine_greedy(llm, prompts) == hf_greedy(model_dir, prompts)
    assert_all_blocks_free(llm)


def test_prefix_cache_hits_reuse_blocks_and_match_transformers(llama_dir):
    shared = random_prompts([40], seed=1)[0]
    first = [shared + random_prompts([5], seed=2)[0]]
    second = [shared + tail for tail in random_prompts([7, 3], seed=3)]
    llm = LLM(llama_dir, block_size=8, num_kv_blocks=128)
    engine_greedy(llm, first)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in second], params)
    # 40 shared tokens = 5 full blocks of 8, found in the cache without recomputation
    assert [o.num_cached_tokens for o in outputs] == [40, 40]
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(llama_dir, second)
    assert_all_blocks_free(llm)


def test_forced_preemption_still_matches_transformers(llama_dir):
    prompts = random_prompts([20, 22, 25, 18], seed=4)
    # 11 usable blocks of 8 tokens cannot hold four requests of ~50 tokens (7 blocks each) at once
    llm = LLM(llama_dir, block_size=8, num_kv_blocks=12, max_model_len=80)
    out = engine_greedy(llm, prompts, max_tokens=30)
    assert llm.engine.scheduler_stats().num_preemptions > 0
    assert out == hf_greedy(llama_dir, prompts, max_tokens=30)
    assert_all_blocks_free(llm)


def test_sharded_checkpoint_loads_to_the_same_outputs(tmp_path, tokenizer_dir, llama_dir):
    from services.engine.default_model import build_model_dir

    arch, overrides = TINY_MODEL_VARIANTS["llama"]
    sharded = build_model_dir(
        tmp_path / "sharded", arch, tokenizer_dir=tokenizer_dir, max_shard_size="40KB", **overrides
    )
    assert (sharded / "model.safetensors.index.json").exists()
    prompts = random_prompts([11, 6], seed=5)
    assert engine_greedy(LLM(str(sharded)), prompts) == engine_greedy(LLM(llama_dir), prompts)


def test_logprobs_match_transformers_log_softmax(llama_dir):
    prompt = random_prompts([13], seed=6)[0]
    llm = LLM(llama_dir)
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    )[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)  # [6, vocab]
    for step, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert len(entry) == 5 + (token_id not in entry)
        top = torch.topk(ref[step], 5)
        assert set(top.indices.tolist()) <= set(entry)
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[step, tid].item(), abs=1e-4)
        assert entry[token_id].rank == 1  # greedy picks the top token
