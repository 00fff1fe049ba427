"""A worker's own /metrics families (services.workers.metrics), read from its stats."""

from services.common.control import KVTierStats, SchedulerStats, SecondsHistogramSnapshot
from services.workers.metrics import _scheduler_families


def test_a_worker_exports_its_requests_phases():
    snapshot = SecondsHistogramSnapshot(buckets=[(0.5, 1), (float("inf"), 2)], sum_s=3.0)
    scheduler = SchedulerStats(
        num_running_requests=0,
        num_waiting_requests=0,
        num_decoding_requests=0,
        queued_prefill_tokens=0,
        kv_tiers=[KVTierStats(tier="device", num_free_blocks=1, num_total_blocks=1)],
        num_preemptions=0,
        prefix_cache_queried_tokens=0,
        prefix_cache_hit_tokens=0,
        phase_seconds={"prefill": snapshot},
    )
    families = {f.name: f for f in _scheduler_families(scheduler, ["m", "prefill", "p0"])}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["vllm:request_prefill_time_seconds"].samples}
    assert samples[("vllm:request_prefill_time_seconds_bucket", "0.5")] == 1
    assert samples[("vllm:request_prefill_time_seconds_count", None)] == 2
