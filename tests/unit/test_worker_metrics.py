"""A worker's own /metrics families (services.workers.metrics), read from its stats, and the same series
from the gateway's exporter of the workers' snapshots (services.gateway.metrics)."""

import msgspec

from services.common.control import CacheConfigInfo, SecondsHistogramSnapshot, TokensHistogramSnapshot, WorkerStats
from services.gateway.metrics import _WorkerCollector as _GatewayCollector
from services.gateway.worker_state import worker_snapshot
from services.workers.metrics import WorkerCollector, _scheduler_families
from tests.unit.test_control import ENGINE_STATS


def test_a_worker_exports_its_requests_phases():
    snapshot = SecondsHistogramSnapshot(buckets=[(0.5, 1), (float("inf"), 2)], sum_s=3.0)
    assert ENGINE_STATS.scheduler is not None
    scheduler = msgspec.structs.replace(ENGINE_STATS.scheduler, phase_seconds={"prefill": snapshot})
    families = {f.name: f for f in _scheduler_families(scheduler, ["m", "prefill", "p0"])}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["vllm:request_prefill_time_seconds"].samples}
    assert samples[("vllm:request_prefill_time_seconds_bucket", "0.5")] == 1
    assert samples[("vllm:request_prefill_time_seconds_count", None)] == 2


def test_both_exporters_give_the_same_tokens_per_step_and_cache_configuration_series():
    assert ENGINE_STATS.scheduler is not None
    tokens = TokensHistogramSnapshot(buckets=[(1.0, 2), (8.0, 5), (float("inf"), 6)], sum_tokens=40)
    config = CacheConfigInfo(
        block_size=16,
        num_gpu_blocks=1000,
        enable_prefix_caching=True,
        cache_dtype="bfloat16",
        gpu_memory_utilization=0.9,
    )
    scheduler = msgspec.structs.replace(ENGINE_STATS.scheduler, iteration_tokens=tokens, cache_config=config)
    stats = msgspec.structs.replace(ENGINE_STATS, scheduler=scheduler)
    stats = msgspec.msgpack.decode(msgspec.msgpack.encode(stats), type=WorkerStats)  # as the state socket carries it
    worker = {f.name: f.samples for f in WorkerCollector(lambda: stats, "m").collect()}
    gateway = _GatewayCollector("m")
    gateway.snapshot = [worker_snapshot(stats)]
    exported = {f.name: f.samples for f in gateway.collect()}
    samples = {(s.name, s.labels.get("le")): s.value for s in worker["vllm:iteration_tokens_total"]}
    assert samples[("vllm:iteration_tokens_total_bucket", "8.0")] == 5
    assert samples[("vllm:iteration_tokens_total_sum", None)] == 40
    [info] = worker["vllm:cache_config_info"]
    assert info.value == 1 and info.labels == {
        "model_name": "m",
        "stage": "colocated",
        "worker": "colocated-0",
        "block_size": "16",
        "num_gpu_blocks": "1000",
        "enable_prefix_caching": "True",
        "cache_dtype": "bfloat16",
        "gpu_memory_utilization": "0.9",
    }
    for name in ("vllm:iteration_tokens_total", "vllm:cache_config_info"):
        assert exported[name] == worker[name]
