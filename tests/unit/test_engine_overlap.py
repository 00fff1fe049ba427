"""Overlapped steps (outputs built while the next step runs) and asynchronous scheduling (the next
step launched before this one's tokens are collected) against the plain order: the same tokens,
text, logprobs and finishes, streamed the same way, with every block freed."""

from __future__ import annotations

import random

import pytest

from services.engine import LLMEngine, SamplingParams

ENGINE = dict(block_size=8, num_kv_blocks=20, max_num_batched_tokens=48)  # small: chunking and preemption


def workload(seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    shared = [rng.randrange(5, 900) for _ in range(24)]  # a common prefix: prefix-cache hits
    kinds = [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=25, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=5, n=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop=["e", "th"], include_stop_str_in_output=True),
        SamplingParams(temperature=0.7, seed=3, max_tokens=20, min_tokens=10, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=15, stop_token_ids=[7, 19, 200], presence_penalty=0.5),
    ]
    requests = []
    for i in range(12):
        prompt = (shared if i % 2 else []) + [rng.randrange(5, 900) for _ in range(rng.randrange(1, 40))]
        requests.append((f"r{i}", prompt, kinds[i % len(kinds)]))
    return requests


def run(llama_dir: str, requests: list, overlap: bool, async_scheduling: bool = False) -> tuple[dict, dict, LLMEngine]:
    engine = LLMEngine(model=llama_dir, overlap_outputs=overlap, async_scheduling=async_scheduling, **ENGINE)
    pending = list(requests)
    streamed: dict[tuple[str, int], list] = {}
    finals = {}
    for step in range(2000):
        if step % 2 == 0 and pending:  # arrivals while others run
            engine.add_request(*pending.pop(0))
        if not pending and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            for c in out.outputs:
                streamed.setdefault((out.request_id, c.index), []).append((list(c.delta_token_ids), c.delta_text))
            if out.finished:
                finals[out.request_id] = out
    return finals, streamed, engine


@pytest.mark.parametrize("seed", [0, 1])
def test_overlapped_steps_give_the_plain_order_s_outputs(llama_dir, seed):
    plain, plain_streamed, plain_engine = run(llama_dir, workload(seed), overlap=False)
    overlap, overlap_streamed, overlap_engine = run(llama_dir, workload(seed), overlap=True)
    assert set(plain) == set(overlap) == {f"r{i}" for i in range(12)}
    for request_id, expected in plain.items():
        got = overlap[request_id]
        for e, g in zip(expected.outputs, got.outputs, strict=True):
            assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
                e.token_ids,
                e.text,
                e.finish_reason,
                e.stop_reason,
            )
            if e.logprobs is not None:
                assert g.logprobs == e.logprobs
    # streamed deltas: the same pieces in the same order (empty steps aside)
    assert {k: [d for d in v if d != ([], "")] for k, v in overlap_streamed.items()} == {
        k: [d for d in v if d != ([], "")] for k, v in plain_streamed.items()
    }
    stats = overlap_engine.scheduler_stats()
    assert stats.num_preemptions == plain_engine.scheduler_stats().num_preemptions > 0
    assert stats.prefix_cache_hit_tokens > 0
    assert any(o.outputs[0].stop_reason in ("e", "th") for o in plain.values())  # a stop string ended one
    for engine in (plain_engine, overlap_engine):
        assert not engine.has_unfinished_requests()
        assert engine.num_free_blocks() == engine.num_usable_blocks()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_aborted_while_its_step_runs_is_dropped_and_freed(llama_dir, async_scheduling):
    engine = LLMEngine(model=llama_dir, overlap_outputs=True, async_scheduling=async_scheduling, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("victim", [5] * 30, params)
    engine.add_request("other", [9] * 10, params)
    engine.step()  # launches the first step; nothing collected yet
    engine.step()  # asynchronous: the second is launched before the first is collected
    assert engine.has_unfinished_requests()
    assert engine.abort_request("victim")  # its step is in flight
    engine.add_request("victim", [6] * 12, params)  # the id is free again: a new request
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert len(finals["victim"].outputs[0].token_ids) == 20 and len(finals["other"].outputs[0].token_ids) == 20
    assert finals["victim"].prompt_token_ids == [6] * 12
    assert engine.num_free_blocks() == engine.num_usable_blocks()


def async_workload(seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    """The mixed workload without penalties (they keep steps from being launched ahead)."""
    requests = []
    for request_id, prompt, params in workload(seed):
        if params.repetition_penalty != 1.0 or params.presence_penalty != 0.0:
            params = SamplingParams(temperature=0.6, seed=9, max_tokens=18, min_tokens=6, ignore_eos=True)
        requests.append((request_id, prompt, params))
    return requests


@pytest.mark.parametrize("seed", [0, 1])
def test_asynchronous_scheduling_gives_the_plain_order_s_tokens(llama_dir, seed):
    plain, _, plain_engine = run(llama_dir, async_workload(seed), overlap=False)
    fast, _, fast_engine = run(llama_dir, async_workload(seed), overlap=True, async_scheduling=True)
    assert set(plain) == set(fast) == {f"r{i}" for i in range(12)}
    for request_id, expected in plain.items():
        for e, g in zip(expected.outputs, fast[request_id].outputs, strict=True):
            assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
                e.token_ids,
                e.text,
                e.finish_reason,
                e.stop_reason,
            )
            if e.logprobs is not None:  # batches differ (a seat frees a step later): the sums, in their last bits
                for g_step, e_step in zip(g.logprobs, e.logprobs, strict=True):
                    assert g_step.keys() == e_step.keys()
                    assert all(g_step[t].logprob == pytest.approx(e_step[t].logprob, abs=1e-4) for t in e_step)
    assert fast_engine.scheduler_stats().num_preemptions > 0  # preempted with a token in flight too
    for engine in (plain_engine, fast_engine):
        assert not engine.has_unfinished_requests()
        assert engine.num_free_blocks() == engine.num_usable_blocks()
