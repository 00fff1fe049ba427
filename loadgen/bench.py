"""One benchmark run, end to end: requests -> arrivals -> run loop -> summary -> files.

build_requests(...)              the workload's requests, once per command (compare and
                                 sweep send the same requests to every target and rate)
run_benchmark(target, plan, ...) send them, summarize, write results.jsonl and summary.json
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadgen.arrivals import ArrivalConfig, arrival_offsets
from loadgen.client import RequestOptions, StreamingClient, Target
from loadgen.metrics import SLO, summarize
from loadgen.prompts import PromptSynthesizer, load_tokenizer
from loadgen.records import RequestResult, RequestSpec
from loadgen.report import ProgressBar, write_run
from loadgen.runner import run_requests
from loadgen.workloads import Workload, describe

MODELS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RunPlan:
    """How to send a workload's requests; the same for every target of a command."""

    arrivals: ArrivalConfig
    time_limit_s: float
    request_timeout_s: float
    slo: SLO
    options: RequestOptions
    show_progress: bool = True


def build_requests(
    workload: Workload, num_requests: int | None, tokenizer_path: str | None, seed: int
) -> list[RequestSpec]:
    synthesizer = PromptSynthesizer(load_tokenizer(tokenizer_path))
    return workload.build(num_requests, synthesizer, np.random.default_rng([seed, 0]))


def discover_model(base_url: str, api_key: str | None) -> str:
    """The first model that GET /v1/models lists."""
    base = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base}/v1/models", headers=headers, timeout=MODELS_TIMEOUT_S, trust_env=False)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _offsets(plan: RunPlan, specs: list[RequestSpec]) -> list[float]:
    from_trace = bool(specs) and all(spec.offset_s is not None for spec in specs)
    trace_offsets = [float(spec.offset_s or 0.0) for spec in specs] if from_trace else None
    return arrival_offsets(plan.arrivals, len(specs), trace_offsets)


def run_benchmark(
    target: Target, plan: RunPlan, workload: Workload, specs: list[RequestSpec], out_dir: Path
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Send `specs` to `target`; write the run's files under `out_dir`; return summary and results."""
    offsets_s = _offsets(plan, specs)

    async def send_all() -> Any:
        async with StreamingClient(target, plan.options, plan.request_timeout_s) as client:
            with ProgressBar(f"{target.name}", len(specs), plan.show_progress) as bar:
                return await run_requests(
                    client, specs, offsets_s, plan.arrivals.max_concurrency, plan.time_limit_s, bar.advance
                )

    outcome = asyncio.run(send_all())
    from_trace = bool(specs) and specs[0].offset_s is not None
    summary = {
        "target": target.name,
        "base_url": target.base_url,
        "model": target.model,
        "endpoint": target.endpoint,
        "workload": describe(workload),
        "arrivals": plan.arrivals.describe(from_trace),
        "rate": plan.arrivals.rate if plan.arrivals.is_paced else None,
        "burstiness": plan.arrivals.burstiness,
        "max_concurrency": plan.arrivals.max_concurrency,
        "time_limit_s": plan.time_limit_s,
        "hit_time_limit": outcome.hit_time_limit,
        **summarize(outcome.results, outcome.duration_s, plan.slo, outcome.num_not_sent),
    }
    write_run(out_dir, outcome.results, summary, plan.slo)
    return summary, outcome.results
