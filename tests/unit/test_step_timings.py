"""The engine's own timings for the router (services.engine.step_timings): steps and finished requests."""

from types import SimpleNamespace

import msgspec
import pytest

from services.common.control import FinishedRequestTiming, SchedulerStats, StepTiming
from services.engine import step_timings
from services.engine.step_timings import StepTimings


def running(num_computed_tokens):
    return SimpleNamespace(num_computed_tokens=num_computed_tokens)


def test_a_step_is_timed_from_its_launch_to_its_collection(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(step_timings.time, "monotonic", lambda: now[0])
    timings = StepTimings()
    pending = object()
    # a prompt chunk of 6 tokens after 4 (context 10) and a decode at context 21: 6 x 10 + 1 x 21 pairs
    timings.launched(10.0, [running(10), running(21)], [6, 1], pending)
    now[0] = 10.25
    timings.collected(pending)
    assert timings.recent_steps() == [StepTiming(0, 1, 7, 81, 0.25)]


def test_steps_that_sample_nothing_are_timed_with_the_next_one_that_does(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(step_timings.time, "monotonic", lambda: now[0])
    timings = StepTimings()
    first, second = object(), object()
    timings.launched(1.0, [running(8)], [8], None)  # a middle prompt chunk: nothing waited for
    timings.launched(1.5, [running(16)], [8], first)
    timings.launched(2.0, [running(17)], [1], second)  # launched ahead (asynchronous scheduling)
    now[0] = 2.5
    timings.collected(first)  # the chunk and `first` are done; `second` stays open
    now[0] = 3.0
    timings.collected(second)
    timings.collected(object())  # never launched here: ignored
    assert timings.recent_steps() == [StepTiming(0, 2, 16, 8 * 8 + 8 * 16, 1.5), StepTiming(1, 1, 1, 17, 1.0)]


def test_finished_requests_report_ttft_tpot_and_length():
    timings = StepTimings(max_recent=2)
    for i, num_output in enumerate([1, 5, 3]):
        request = SimpleNamespace(
            request_id=f"r{i}", arrival_time_s=1.0, first_token_s=1.5, output_token_ids=[0] * num_output
        )
        timings.finished(request, end_s=2.5)
    timings.finished(SimpleNamespace(request_id="x", first_token_s=None), end_s=3.0)  # never produced a token
    assert timings.recent_finished() == [
        FinishedRequestTiming(1, "r1", 5, 0.5, pytest.approx(0.25)),
        FinishedRequestTiming(2, "r2", 3, 0.5, pytest.approx(0.5)),
    ]  # the ring keeps the last two; a single token has no TPOT (r0: 0.0)


def test_the_timings_travel_in_scheduler_stats():
    stats = SchedulerStats(
        num_running_requests=0,
        num_waiting_requests=0,
        num_decoding_requests=0,
        queued_prefill_tokens=0,
        kv_tiers=[],
        num_preemptions=0,
        prefix_cache_queried_tokens=0,
        prefix_cache_hit_tokens=0,
        recent_steps=[StepTiming(3, 1, 128, 4096, 0.01)],
        recent_finished=[FinishedRequestTiming(7, "r", 12, 0.2, 0.03)],
    )
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(stats), type=SchedulerStats)
    assert decoded == stats
    assert SchedulerStats(**{f: getattr(stats, f) for f in stats.__struct_fields__[:8]}).recent_steps == []


def test_a_tiny_engine_reports_its_steps_and_finished_requests(llama_dir):
    from services.engine import LLMEngine, SamplingParams

    engine = LLMEngine(
        model=llama_dir,
        block_size=8,
        num_kv_blocks=64,
        max_num_batched_tokens=32,
        max_num_seqs=1,
        overlap_outputs=False,
    )
    engine.add_request("a", list(range(10, 50)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.scheduler_stats()
    # 32 prompt tokens (nothing sampled), then the last 8 and the first token: timed together;
    # then one decode at context 41
    assert [(t.seq, t.num_steps, t.num_tokens, t.num_attention_pairs) for t in stats.recent_steps] == [
        (0, 2, 40, 32 * 32 + 8 * 40),
        (1, 1, 1, 41),
    ]
    assert all(t.duration_s > 0 for t in stats.recent_steps)
    (done,) = stats.recent_finished
    assert (done.seq, done.request_id, done.num_output_tokens) == (0, "a", 2) and done.ttft_s > 0 and done.tpot_s > 0
