"""SLO-aware admission (services/engine/slo_admission.py) and its step-time model (step_model.py).

The admission rule runs on a real cache (block size 4) with a step-time model of fixed coefficients
(its prior, never refitted): 1 ms per prefill token and 1 ms per decode, nothing else, so a step's
predicted time is easy to read: `prefill tokens + decodes` milliseconds.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.engine import LLMEngine, SamplingParams
from services.engine.config import EngineConfig
from services.engine.kv_cache.manager import KVCacheManager
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams as Params
from services.engine.scheduler import ScheduledBatch, Scheduler
from services.engine.slo_admission import SLOAdmission
from services.engine.step_model import PRIOR_COEFFICIENTS, StepLoad, StepTimeModel
from services.engine.step_timings import StepTimings

BLOCK = 4
MS = 1e-3
FIXED = (0.0, 1 * MS, 0.0, 1 * MS, 0.0)  # (a, b per prefill token, c, d per decode, e)


class Clock:
    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def fixed_model() -> StepTimeModel:
    return StepTimeModel(prior=FIXED, min_samples=10**9)


def make_scheduler(
    tpot_slo_s: float | None,
    ttft_slo_s: float | None = None,
    clock: Clock | None = None,
    policy: str = "fcfs",
    max_hold_s: float = 10.0,
    num_blocks: int = 64,
) -> Scheduler:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK, enable_prefix_caching=True)
    slo = SLOAdmission(ttft_slo_s, tpot_slo_s, fixed_model(), BLOCK, max_hold_s=max_hold_s, clock=clock or Clock())
    return Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy=policy, slo=slo)


def make_request(request_id: str, num_prompt_tokens: int, arrival_time_s: float = 0.0) -> Request:
    prompt = [ord(request_id[0]) * 100 + i for i in range(num_prompt_tokens)]
    return Request(request_id, prompt, Params(max_tokens=16), None, 16, arrival_time_s=arrival_time_s)


def import_decoding(scheduler: Scheduler, request: Request) -> None:
    """A request whose prompt was computed elsewhere decodes here from the start."""
    assert scheduler.kv_cache.allocate_for_import(request, request.num_prompt_tokens) is not None
    request.output_token_ids.append(7)
    request.num_computed_tokens = request.num_prompt_tokens
    scheduler.kv_cache.commit_imported(request, request.num_prompt_tokens)
    scheduler.add_running(request)


def step(batch: ScheduledBatch) -> None:
    for request, num_new in zip(batch.requests, batch.num_new_tokens):
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(7)


def scheduled(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)]


# ---------------------------------------------------------------------------------- the TPOT rule


def test_a_prefill_is_held_while_decodes_run_and_admitted_when_they_finish():
    sched = make_scheduler(tpot_slo_s=4 * MS)
    decodes = [make_request(d, 8) for d in "xy"]
    for d in decodes:
        import_decoding(sched, d)
    sched.add(make_request("p", 40))
    # two decodes (2 ms) plus one block of prompt (4 ms) would take 6 ms > 4 ms: held
    assert scheduled(sched.schedule()) == [("x", 1), ("y", 1)]
    assert scheduled(sched.schedule()) == [("x", 1), ("y", 1)]
    assert sched.num_slo_held_total == 2 and [r.request_id for r in sched.waiting] == ["p"]
    assert sched.kv_cache.prefix_cache_queried_tokens == 0  # a held request is not looked up step after step
    for d in decodes:
        sched.finish(d, RequestStatus.FINISHED_STOPPED)
    assert scheduled(sched.schedule()) == [("p", 40)]  # nothing decodes: the whole prompt
    assert sched.num_slo_held_total == 2 and sched.kv_cache.prefix_cache_queried_tokens == 40


def test_a_prefill_that_does_not_fit_whole_goes_in_the_largest_block_multiple_that_does():
    sched = make_scheduler(tpot_slo_s=11 * MS)
    import_decoding(sched, make_request("x", 8))
    p = make_request("p", 40)
    sched.add(p)
    batch = sched.schedule()  # 1 ms of decode leaves 10 ms: 8 tokens (two blocks), not 10 or 40
    assert scheduled(batch) == [("x", 1), ("p", 8)]
    assert sched.slo is not None and sched.slo.num_cut_total == 1 and sched.num_slo_held_total == 0
    step(batch)
    assert scheduled(sched.schedule()) == [("x", 1), ("p", 8)]  # its next chunk is cut the same way


def test_a_prompt_chunk_of_a_running_request_is_cut_too_and_a_held_one_ends_the_steps_prefills():
    sched = make_scheduler(tpot_slo_s=6 * MS)
    p = make_request("p", 40)
    sched.add(p)
    step(sched.schedule())  # alone, its whole prompt goes: from here it decodes
    assert p.num_computed_tokens == 40
    q, r = make_request("q", 20), make_request("r", 20)
    sched.add(q)
    sched.add(r)
    batch = sched.schedule()  # p decodes (1 ms): q gets one block (4 ms): 5 ms; r would make it 9 ms
    assert scheduled(batch) == [("p", 1), ("q", 4)]
    step(batch)
    assert scheduled(sched.schedule()) == [("p", 1), ("q", 4)]  # q's running chunk cut; r still held
    assert [x.request_id for x in sched.waiting] == ["r"]


def test_a_request_whose_slack_is_exhausted_is_admitted_whatever_it_costs_the_decodes():
    clock = Clock(0.0)
    sched = make_scheduler(tpot_slo_s=4 * MS, clock=clock, max_hold_s=1.0)
    import_decoding(sched, make_request("x", 8))
    sched.add(make_request("p", 40, arrival_time_s=0.0))
    assert scheduled(sched.schedule()) == [("x", 1)]
    # deadline 1 s after arrival, less the 40 ms its prompt takes alone: held until 0.96 s
    clock.now_s = 0.95
    assert scheduled(sched.schedule()) == [("x", 1)]
    clock.now_s = 0.96
    assert scheduled(sched.schedule()) == [("x", 1), ("p", 40)]
    assert sched.slo is not None and sched.slo.num_forced_total == 1 and sched.num_slo_held_total == 2


def test_with_a_ttft_slo_the_starvation_deadline_is_arrival_plus_the_slo():
    clock = Clock(0.0)
    sched = make_scheduler(tpot_slo_s=4 * MS, ttft_slo_s=0.2, clock=clock, max_hold_s=100.0)
    import_decoding(sched, make_request("x", 8))
    sched.add(make_request("p", 40, arrival_time_s=0.0))
    clock.now_s = 0.15
    assert scheduled(sched.schedule()) == [("x", 1)]
    clock.now_s = 0.16  # 0.2 s - 40 ms
    assert scheduled(sched.schedule()) == [("x", 1), ("p", 40)]


def test_without_a_tpot_slo_nothing_is_held():
    sched = make_scheduler(tpot_slo_s=None, ttft_slo_s=1.0)
    import_decoding(sched, make_request("x", 8))
    sched.add(make_request("p", 40))
    assert scheduled(sched.schedule()) == [("x", 1), ("p", 40)]


# ---------------------------------------------------------------------------------- TTFT slack order


def test_with_a_ttft_slo_waiting_requests_go_least_slack_first():
    # keys: arrival + 1 s - prompt ms: a (t=0, 8 tokens) 0.992, b (t=0.01, 40) 0.970, c (t=0.02, 4) 1.016
    sched = make_scheduler(tpot_slo_s=None, ttft_slo_s=1.0, num_blocks=8)
    for rid, n, t in [("a", 8, 0.0), ("b", 40, 0.01), ("c", 4, 0.02)]:
        sched.add(make_request(rid, n, arrival_time_s=t))
    order = []
    while sched.waiting:
        order.append(sched.waiting.pop().request_id)
    assert order == ["b", "a", "c"]


def test_slack_order_keeps_preempted_requests_first():
    sched = make_scheduler(tpot_slo_s=None, ttft_slo_s=1.0)
    early, late = make_request("a", 8, 0.0), make_request("b", 40, 0.01)
    sched.add(early)
    sched.add(late)
    preempted = make_request("p", 4, 0.5)
    sched.waiting.push_front(preempted)
    assert sched.waiting.peek() is preempted
    sched.waiting.remove(late)
    assert [sched.waiting.pop().request_id for _ in range(2)] == ["p", "a"]


def test_preble_groups_order_by_slack_inside_a_group():
    sched = make_scheduler(tpot_slo_s=None, ttft_slo_s=1.0, policy="preble")
    for rid, n, t in [("a", 8, 0.0), ("b", 40, 0.01), ("c", 4, 0.02)]:  # no cache hits: all in group 0
        sched.add(make_request(rid, n, arrival_time_s=t))
    sched.waiting.refresh()
    assert [sched.waiting.pop().request_id for _ in range(3)] == ["b", "a", "c"]


# ---------------------------------------------------------------------------------- off = today

# Recorded with the scheduler before SLO-aware admission existed (both policies agree here).
RECORDED_TRACE = [
    (["a", "b"], [11, 1], []), (["a", "b"], [1, 8], []), (["a", "b"], [1, 8], []), (["a", "b", "c"], [1, 3, 5], []),
    (["a", "b", "c", "d"], [1, 1, 1, 5], []), (["a", "b", "c", "d"], [1, 1, 1, 1], []),
    (["b", "c", "d", "e"], [1, 1, 1, 8], []), (["b", "c", "d"], [1, 1, 1], []), (["b", "c", "d"], [1, 1, 1], ["e"]),
    (["c", "d", "e"], [1, 1, 8], []), (["e"], [12], []), (["e", "f"], [10, 1], []), (["e", "f"], [1, 1], []),
    (["e", "f"], [1, 1], []), (["e", "f"], [1, 1], []), (["e", "f"], [1, 1], []), (["e", "f"], [1, 1], []),
    ([], [], []),
]  # fmt: skip


def scenario_trace(policy: str, slo: SLOAdmission | None) -> list:
    """Prefix sharing, chunking beside decodes, KV pressure and a preemption, one step per time unit."""
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    sched = Scheduler(kv, 12, 4, max_prefill_tokens_beside_decodes=8, scheduling_policy=policy, slo=slo)
    shared = list(range(500, 508))
    prompts = {
        "a": shared + [1, 2, 3], "b": list(range(100, 120)), "c": shared + [9] * 6, "d": [7] * 5,
        "e": list(range(200, 230)), "f": shared + [4],
    }  # fmt: skip
    arrivals = {"a": 0, "b": 0, "c": 1, "d": 3, "e": 4, "f": 6}
    trace = []
    for t in range(len(RECORDED_TRACE)):
        for rid, at in arrivals.items():
            if at == t:
                sched.add(Request(rid, prompts[rid], Params(max_tokens=6), None, 6, arrival_time_s=float(at)))
        batch = sched.schedule()
        trace.append(
            (
                [r.request_id for r in batch.requests],
                list(batch.num_new_tokens),
                [r.request_id for r in batch.preempted],
            )
        )
        step(batch)
        for r in batch.requests:
            if r.num_output_tokens >= r.max_output_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
    return trace


@pytest.mark.parametrize("policy", ["fcfs", "preble"])
def test_without_slos_or_with_a_tpot_slo_never_reached_the_decisions_are_todays(policy):
    assert scenario_trace(policy, None) == RECORDED_TRACE
    loose = SLOAdmission(None, 1e9, fixed_model(), BLOCK)
    assert scenario_trace(policy, loose) == RECORDED_TRACE


# Recorded with the engine before SLO-aware admission existed (tiny llama, greedy).
RECORDED_ENGINE_TRACE = [
    (["a"], [32]), (["a", "b"], [8, 9]), (["a", "b", "c"], [1, 1, 16]), (["a", "b", "c"], [1, 1, 14]),
    (["a", "b", "c"], [1, 1, 1]), (["a", "b", "c", "d"], [1, 1, 1, 16]), (["a", "b", "c", "d"], [1, 1, 1, 16]),
    (["c", "d"], [1, 16]), (["c", "d"], [1, 16]), (["d", "e"], [6, 5]), (["d", "e"], [1, 1]), (["d", "e"], [1, 1]),
    (["d", "e"], [1, 1]), (["d", "e"], [1, 1]), (["d", "e"], [1, 1]),
]  # fmt: skip


def engine_trace(engine: LLMEngine) -> tuple[list, dict[str, list[int]]]:
    """Requests arriving at steps 0, 2 and 5; every batch the engine scheduled, and the tokens."""
    trace = []
    schedule = engine.scheduler.schedule

    def recording() -> ScheduledBatch:
        batch = schedule()
        trace.append(([r.request_id for r in batch.requests], list(batch.num_new_tokens)))
        return batch

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    arrivals = {0: [("a", 40), ("b", 9)], 2: [("c", 30)], 5: [("d", 70), ("e", 5)]}
    tokens = {}
    for t in range(200):
        for rid, n in arrivals.get(t, []):
            prompt = [10 + (i * 7 + ord(rid)) % 200 for i in range(n)]
            engine.add_request(rid, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        if t > 5 and not engine.has_unfinished_requests():
            break
    return [b for b in trace if b[0]], tokens


def test_an_engine_without_slos_schedules_as_today_and_a_tight_tpot_slo_changes_batches_not_tokens(llama_dir):
    config = EngineConfig(
        model=llama_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=32, max_prefill_tokens_beside_decodes=16
    )
    today, today_tokens = engine_trace(LLMEngine(config))
    assert today == RECORDED_ENGINE_TRACE
    engine = LLMEngine(config, tpot_slo_ms=1e-3, ttft_slo_ms=1e4)  # 1 us: nothing fits beside a decode
    assert engine.scheduler.slo is not None
    engine.scheduler.slo.max_hold_s = 1e4
    held, held_tokens = engine_trace(engine)
    assert held_tokens == today_tokens
    assert held != today and engine.scheduler.num_slo_held_total > 0
    for _, num_new in held:  # a step that decodes takes no prompt chunk
        decodes = [n for n in num_new if n == 1]
        assert not decodes or len(decodes) == len(num_new)


# ---------------------------------------------------------------------------------- the step-time model


def synthetic_loads(rng: random.Random, n: int) -> list[tuple[StepLoad, int]]:
    loads = []
    for _ in range(n):
        num_decodes = rng.randrange(0, 64)
        prefill_tokens = rng.choice([0, rng.randrange(1, 2048)])
        context = rng.randrange(0, 4096)
        load = StepLoad(
            prefill_tokens=prefill_tokens,
            prefill_pairs=prefill_tokens * (context + prefill_tokens),
            num_decodes=num_decodes,
            decode_context_tokens=num_decodes * rng.randrange(16, 4096),
        )
        loads.append((load, rng.choice([1, 1, 1, 2])))
    return loads


def test_the_fit_recovers_known_coefficients():
    truth = (0.004, 5e-5, 2e-9, 2e-4, 1e-8)
    model = StepTimeModel(min_samples=32, max_samples=256, refit_every=16)
    truth_model = StepTimeModel(prior=truth)
    assert model.coefficients != truth and not model.fitted
    for load, num_steps in synthetic_loads(random.Random(0), 256):
        # num_steps steps of this load together: the constant counts once per step
        seconds = truth_model.predict_s(load) + (num_steps - 1) * truth[0]
        model.observe(load, num_steps, seconds)
    assert model.fitted
    np.testing.assert_allclose(model.coefficients, truth, rtol=1e-6)


def test_the_fit_is_non_negative_and_keeps_the_prior_without_data():
    model = StepTimeModel(min_samples=8, refit_every=1)
    model.observe(StepLoad(prefill_tokens=100), 1, 0.01)
    assert model.coefficients == PRIOR_COEFFICIENTS and not model.fitted  # too few samples: the prior
    rng = random.Random(1)
    for _ in range(64):  # decodes cheapen the step (a negative cost): the fit clamps it to zero
        tokens, decodes = rng.randrange(1, 1000), rng.randrange(0, 64)
        model.observe(StepLoad(prefill_tokens=tokens, num_decodes=decodes), 1, 0.002 + 1e-5 * tokens - 1e-6 * decodes)
    assert model.fitted and min(model.coefficients) >= 0 and model.coefficients[3] == 0.0
    assert model.coefficients[1] == pytest.approx(1e-5, rel=0.1)


def test_the_offload_term_is_a_pcie_time_and_zero_today():
    model = StepTimeModel(prior=FIXED, pcie_bytes_per_s=1e9)
    assert model.offload_transfer_s(StepLoad(prefill_tokens=4)) == 0.0
    assert model.predict_s(StepLoad(prefill_tokens=4, offloaded_kv_bytes=2 * 10**6)) == pytest.approx(4 * MS + 2 * MS)


def test_step_timings_feed_the_model_each_steps_load_and_busy_time(monkeypatch):
    from services.engine import step_timings

    now = [0.0]
    monkeypatch.setattr(step_timings.time, "monotonic", lambda: now[0])
    seen: list[tuple[StepLoad, int, float]] = []
    model = fixed_model()
    model.observe = lambda load, k, s: seen.append((load, k, s))  # type: ignore[method-assign]
    timings = StepTimings(step_model=model)
    p, d = make_request("p", 12), make_request("d", 4)
    d.output_token_ids.append(7)
    first, second = object(), object()
    p.num_computed_tokens, d.num_computed_tokens = 8, 5  # counted after the launch: p's 8, d's 1
    timings.launched(1.0, [d, p], [1, 8], first)
    p.num_computed_tokens, d.num_computed_tokens = 12, 6
    timings.launched(1.5, [d, p], [1, 4], second)  # launched ahead while `first` runs
    now[0] = 2.0
    timings.collected(first)
    now[0] = 2.25
    timings.collected(second)  # busy from `first`'s collection, not from its own launch
    assert seen == [
        (StepLoad(prefill_tokens=8, prefill_pairs=64, num_decodes=1, decode_context_tokens=5), 1, 1.0),
        (StepLoad(prefill_tokens=4, prefill_pairs=48, num_decodes=1, decode_context_tokens=6), 1, 0.25),
    ]


# ---------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field", ["ttft_slo_ms", "tpot_slo_ms"])
@pytest.mark.parametrize("value", [0, -5.0, float("nan"), float("inf"), "50"])
def test_an_slo_must_be_a_positive_number_of_milliseconds(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(device="cpu", **{field: value}).resolved()


def test_the_cli_passes_both_slos_and_leaves_them_off_by_default():
    import argparse

    from services.cli import _add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    _add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--ttft-slo-ms", "500", "--tpot-slo-ms", "40"]))
    assert (config.ttft_slo_ms, config.tpot_slo_ms) == (500.0, 40.0)
    config = engine_config_from_args(parser.parse_args([]))
    assert (config.ttft_slo_ms, config.tpot_slo_ms) == (None, None)
