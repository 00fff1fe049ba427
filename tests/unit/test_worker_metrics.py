"""A worker's own /metrics families (services.workers.metrics), read from its stats."""

import msgspec

from services.common.control import SecondsHistogramSnapshot
from services.workers.metrics import _scheduler_families
from tests.unit.test_control import ENGINE_STATS


def test_a_worker_exports_its_requests_phases():
    snapshot = SecondsHistogramSnapshot(buckets=[(0.5, 1), (float("inf"), 2)], sum_s=3.0)
    assert ENGINE_STATS.scheduler is not None
    scheduler = msgspec.structs.replace(ENGINE_STATS.scheduler, phase_seconds={"prefill": snapshot})
    families = {f.name: f for f in _scheduler_families(scheduler, ["m", "prefill", "p0"])}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["vllm:request_prefill_time_seconds"].samples}
    assert samples[("vllm:request_prefill_time_seconds_bucket", "0.5")] == 1
    assert samples[("vllm:request_prefill_time_seconds_count", None)] == 2
