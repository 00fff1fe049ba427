"""tristage's Grafana dashboard, as code.

    python deploy/grafana/dashboards.py           write the JSON files below
    python deploy/grafana/dashboards.py --check   exit 1 when a committed file differs from this module

The same JSON is written twice, because a Helm chart can only read files inside its own folder:

    deploy/grafana/dashboards/tristage.json   provisioned by docker-compose's Grafana
    helm/tristage/dashboards/tristage.json    shipped in the chart's ConfigMap for Grafana's sidecar

Rows, top to bottom:

    overview    requests/s, admission rejections, TTFT / ITL / end-to-end p50 and p99, goodput
    encode      encode latency, embedding-cache hit rate
    prefill     queue, prompt tokens/s, prefix-cache hit rate, queue and prefill time (prefill and colocated
                workers), tokens per engine step (every worker, by stage)
    decode      running requests, KV-cache usage, ITL, preemptions     (decode and colocated workers)
    transfers   KV and embedding bytes/s, KV transfer latency, failures, fallbacks, migrations
    kv tiers    device and host KV usage, bytes/s offloaded to and onloaded from the host tier, host-tier hit
                tokens/s, admissions held by the TPOT SLO (LayerKV; every engine worker)
    router      decisions by policy and reason, predicted vs observed prefix hits, load imbalance

Every expression reads only the metric catalogue in `METRICS`; tests check that, parse every
expression and run them against a real Prometheus scraping a real `tristage serve`.

Template variables (what tests substitute when they run an expression outside Grafana):

    $datasource       the Prometheus data source
    $model_name       served model name(s), "All" = ".*"
    $ttft_slo         goodput's TTFT bound in seconds: one of the TTFT histogram's bucket bounds
    $itl_slo          goodput's inter-token-latency bound in seconds: one of the ITL bucket bounds
    $__rate_interval  Grafana's rate window (at least four scrape intervals)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafanalib.core import (
    Dashboard,
    GridPos,
    RowPanel,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = (
    REPO_ROOT / "deploy" / "grafana" / "dashboards" / "tristage.json",
    REPO_ROOT / "helm" / "tristage" / "dashboards" / "tristage.json",
)
DASHBOARD_UID = "tristage-overview"

# The metric catalogue: family names as the processes declare them. A counter's samples carry
# `_total` (prometheus_client appends it), a histogram's `_bucket`, `_sum` and `_count`.
COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions",
    "tristage:admission_rejections_total",
    "tristage:kv_transfer_bytes_total",
    "tristage:kv_transfer_failures_total",
    "tristage:kv_transfer_fallbacks_total",
    "tristage:request_migrations_total",
    "tristage:kv_room_waits_total",
    "tristage:router_decisions_total",
    "tristage:router_predicted_hit_tokens_total",
    "tristage:router_observed_hit_tokens_total",
    "tristage:embedding_cache_hits_total",
    "tristage:embedding_cache_queries_total",
    "tristage:embedding_transfer_bytes_total",
    "tristage:kv_offloaded_bytes_total",  # device -> host tier
    "tristage:kv_onloaded_bytes_total",  # host tier -> device
    "tristage:kv_host_hit_tokens_total",
    "tristage:slo_held_admissions",
)
GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "tristage:kv_host_usage_perc",
    "tristage:router_load_imbalance",
    "tristage:requests_waiting_for_kv_room",
    "tristage:gateway_requests_in_flight",
    "tristage:gateway_queued_requests",
    "tristage:gateway_queued_prompt_tokens",
)
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "tristage:ttft_part_seconds",  # by part (services.gateway.ttft)
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "tristage:kv_transfer_seconds",
    "tristage:encode_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:iteration_tokens_total",  # a histogram: its samples are vllm:iteration_tokens_total_bucket, ...
)
METRICS = COUNTERS + GAUGES + HISTOGRAMS


def sample_names() -> frozenset[str]:
    """Every series name a query may select: the catalogue with its exposition suffixes."""
    names = set(GAUGES)
    for name in COUNTERS:
        family = name.removesuffix("_total")
        names |= {family, family + "_total"}
    for name in HISTOGRAMS:
        names |= {name + "_bucket", name + "_sum", name + "_count"}
    return frozenset(names)


DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model_name=~"$model_name"'
WINDOW = "$__rate_interval"
PANEL_WIDTH = 8  # three panels to a line of Grafana's 24 columns
PANEL_HEIGHT = 8
TTFT_SLO_CHOICES_S = ("0.25", "0.5", "1", "2.5", "5")  # bucket bounds of vllm:time_to_first_token_seconds
ITL_SLO_CHOICES_S = ("0.025", "0.05", "0.1", "0.2")  # bucket bounds of vllm:inter_token_latency_seconds


def rate(metric: str, matchers: str = MODEL) -> str:
    return f"rate({metric}{{{matchers}}}[{WINDOW}])"


def quantile(q: float, histogram: str, matchers: str = MODEL, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({rate(histogram + '_bucket', matchers)}))"


def ratio(numerator: str, denominator: str, by: str = "") -> str:
    group = f" by ({by}) " if by else ""
    return f"sum{group}({rate(numerator)}) / sum{group}({rate(denominator)})"


def le_at(variable: str) -> str:
    """A matcher for one bucket bound: Prometheus 2 keeps "1.0" as exposed, Prometheus 3 stores "1"."""
    return f'le=~"${{{variable}}}(\\\\.0)?"'


def target(expr: str, legend: str) -> Target:
    return Target(expr=expr, legendFormat=legend, datasource=DATASOURCE)


def panel(title: str, description: str, unit: str, *targets: Target, **options) -> TimeSeries:
    return TimeSeries(
        title=title,
        description=description,
        unit=unit,
        targets=list(targets),
        dataSource=DATASOURCE,
        tooltipMode="multi",
        legendDisplayMode="list",
        **options,
    )


def p50_p99(histogram: str, matchers: str = MODEL) -> list[Target]:
    return [target(quantile(0.5, histogram, matchers), "p50"), target(quantile(0.99, histogram, matchers), "p99")]


def phase_p50_p99(phases: tuple[str, ...], matchers: str) -> list[Target]:
    """p50 and p99 of each request phase histogram (vllm:request_<phase>_time_seconds), by stage."""
    return [
        target(
            quantile(q, f"vllm:request_{phase}_time_seconds", matchers, "le, stage"), f"{phase} {name} {{{{stage}}}}"
        )
        for phase in phases
        for q, name in ((0.5, "p50"), (0.99, "p99"))
    ]


def overview() -> list[TimeSeries]:
    return [
        panel(
            "Requests / s",
            "Finished completions per second, by finish reason.",
            "reqps",
            target(f"sum by (finished_reason) ({rate('vllm:request_success_total')})", "{{finished_reason}}"),
        ),
        panel(
            "Errors / s",
            "Requests refused by admission (HTTP 429 / 503), by the limit that was reached.",
            "reqps",
            target(f"sum by (reason) ({rate('tristage:admission_rejections_total')})", "{{reason}}"),
        ),
        panel(
            "Gateway queue",
            "Requests admitted and not yet ended, and those still waiting for their first token.",
            "short",
            target(f"sum(tristage:gateway_requests_in_flight{{{MODEL}}})", "in flight"),
            target(f"sum(tristage:gateway_queued_requests{{{MODEL}}})", "waiting for first token"),
        ),
        panel(
            "Time to first token",
            "Arrival to first token, p50 and p99.",
            "s",
            *p50_p99("vllm:time_to_first_token_seconds"),
        ),
        panel(
            "Inter-token latency",
            "Between two steps of one request that brought tokens, p50 and p99.",
            "s",
            *p50_p99("vllm:inter_token_latency_seconds"),
        ),
        panel(
            "End-to-end latency",
            "Arrival to last token of finished requests, p50 and p99.",
            "s",
            *p50_p99("vllm:e2e_request_latency_seconds"),
        ),
        panel(
            "Goodput",
            "Requests per second whose first token came within $ttft_slo s (the TTFT SLO).",
            "reqps",
            target(
                f"sum(rate(vllm:time_to_first_token_seconds_bucket{{{MODEL}, {le_at('ttft_slo')}}}[{WINDOW}]))",
                "TTFT <= $ttft_slo s",
            ),
        ),
        panel(
            "SLO attainment",
            "Share of requests with TTFT within $ttft_slo s, and of token steps within $itl_slo s.",
            "percentunit",
            target(
                f"sum(rate(vllm:time_to_first_token_seconds_bucket{{{MODEL}, {le_at('ttft_slo')}}}"
                f"[{WINDOW}])) / sum({rate('vllm:time_to_first_token_seconds_count')})",
                "TTFT",
            ),
            target(
                f"sum(rate(vllm:inter_token_latency_seconds_bucket{{{MODEL}, {le_at('itl_slo')}}}"
                f"[{WINDOW}])) / sum({rate('vllm:inter_token_latency_seconds_count')})",
                "ITL",
            ),
            valueMin=0,
            valueMax=1,
        ),
        panel(
            "Tokens / s",
            "Prompt tokens of requests that started and tokens generated, per second.",
            "short",
            target(f"sum({rate('vllm:prompt_tokens_total')})", "prompt"),
            target(f"sum({rate('vllm:generation_tokens_total')})", "generation"),
        ),
    ]


TTFT_TOP_PARTS = ("queue", "image_wait", "prefill_queue", "prefill", "other")  # they add up to the TTFT
TTFT_IMAGE_PARTS = ("encoder_queue", "decode", "encode", "transfer")  # image_wait's


def ttft_part_p50s(parts: tuple[str, ...]) -> list[Target]:
    return [target(quantile(0.5, "tristage:ttft_part_seconds", f'{MODEL}, part="{part}"'), part) for part in parts]


def ttft_breakdown() -> list[TimeSeries]:
    return [
        panel(
            "TTFT breakdown (p50, stacked)",
            "Median of each part of the time to first token, stacked: gateway queue (to the request sent to the "
            "workers), image wait, engine queue, prefill, and the rest (network, loop turns). A sum of medians, "
            "close to the median TTFT, not equal to it.",
            "s",
            *ttft_part_p50s(TTFT_TOP_PARTS),
            stacking={"mode": "normal"},
        ),
        panel(
            "Image wait breakdown (p50, stacked)",
            "Median of the slowest image's parts: its encoder's queue, decode and encode, and the embedding "
            "transfer (the remainder of the image wait, at least 0).",
            "s",
            *ttft_part_p50s(TTFT_IMAGE_PARTS),
            stacking={"mode": "normal"},
        ),
        panel(
            "Time to first token",
            "Arrival to first token, p50 and p99, beside its parts.",
            "s",
            *p50_p99("vllm:time_to_first_token_seconds"),
        ),
    ]


def encode() -> list[TimeSeries]:
    return [
        panel(
            "Encode latency",
            "Vision encoder time per request, p50 and p99.",
            "s",
            *p50_p99("tristage:encode_latency_seconds"),
        ),
        panel(
            "Embedding-cache hit rate",
            "Image embeddings found in the encoders' caches.",
            "percentunit",
            target(ratio("tristage:embedding_cache_hits_total", "tristage:embedding_cache_queries_total"), "hit rate"),
            valueMin=0,
            valueMax=1,
        ),
    ]


def stage_matchers(stage: str) -> str:
    return f'{MODEL}, stage=~"{stage}|colocated"'


def prefill() -> list[TimeSeries]:
    workers = stage_matchers("prefill")
    return [
        panel(
            "Prefill queue",
            "Requests waiting on each prefill (or colocated) worker.",
            "short",
            target(f"sum by (worker) (vllm:num_requests_waiting{{{workers}}})", "{{worker}}"),
        ),
        panel(
            "Prompt tokens / s",
            "Prompt tokens of requests that started, per second.",
            "short",
            target(f"sum({rate('vllm:prompt_tokens_total')})", "prompt tokens"),
        ),
        panel(
            "Prefix-cache hit rate",
            "Prompt tokens found in each worker's prefix cache.",
            "percentunit",
            target(
                f"sum by (worker) ({rate('vllm:prefix_cache_hits_total', workers)}) / "
                f"sum by (worker) ({rate('vllm:prefix_cache_queries_total', workers)})",
                "{{worker}}",
            ),
            valueMin=0,
            valueMax=1,
        ),
        panel(
            "Queue and prefill time",
            "Per request on the prefill (or colocated) workers: arrival to first step, and first step to "
            "first token, p50 and p99 by stage.",
            "s",
            *phase_p50_p99(("queue", "prefill"), workers),
        ),
        panel(
            "Tokens per step",
            "Tokens one engine step schedules (prompt chunks and decodes), p50, p99 and mean by stage: how full "
            "the steps run against their budget (max_num_batched_tokens).",
            "short",
            *[
                target(quantile(q, "vllm:iteration_tokens_total", MODEL, "le, stage"), f"{name} {{{{stage}}}}")
                for q, name in ((0.5, "p50"), (0.99, "p99"))
            ],
            target(
                f"sum by (stage) ({rate('vllm:iteration_tokens_total_sum')}) / "
                f"sum by (stage) ({rate('vllm:iteration_tokens_total_count')})",
                "mean {{stage}}",
            ),
        ),
    ]


def decode() -> list[TimeSeries]:
    workers = stage_matchers("decode")
    return [
        panel(
            "Decode running",
            "Requests running on each decode (or colocated) worker.",
            "short",
            target(f"sum by (worker) (vllm:num_requests_running{{{workers}}})", "{{worker}}"),
        ),
        panel(
            "KV-cache usage",
            "Fraction of each worker's KV-cache blocks in use.",
            "percentunit",
            target(f"max by (worker) (vllm:kv_cache_usage_perc{{{workers}}})", "{{worker}}"),
            valueMin=0,
            valueMax=1,
        ),
        panel(
            "Decode inter-token latency",
            "Between two steps of one request, p50, p90 and p99.",
            "s",
            *p50_p99("vllm:inter_token_latency_seconds"),
            target(quantile(0.9, "vllm:inter_token_latency_seconds"), "p90"),
        ),
        panel(
            "Preemptions / s",
            "Requests preempted (their KV freed, to be recomputed) per worker.",
            "short",
            target(f"sum by (worker) ({rate('vllm:num_preemptions_total', workers)})", "{{worker}}"),
        ),
        panel(
            "Generation tokens / s",
            "Tokens generated per second.",
            "short",
            target(f"sum({rate('vllm:generation_tokens_total')})", "tokens"),
        ),
        panel(
            "Decode and inference time",
            "Per request on the decode (or colocated) workers: first token to the end, and first step to "
            "the end, p50 and p99 by stage.",
            "s",
            *phase_p50_p99(("decode", "inference"), workers),
        ),
    ]


def transfers() -> list[TimeSeries]:
    return [
        panel(
            "Transfer bytes / s",
            "KV blocks (prefill to decode) and image embeddings (encode to prefill).",
            "Bps",
            target(f"sum({rate('tristage:kv_transfer_bytes_total')})", "KV"),
            target(f"sum({rate('tristage:embedding_transfer_bytes_total')})", "embeddings"),
        ),
        panel(
            "KV transfer latency",
            "One request's KV from first layer sent to acknowledged, p50 and p99.",
            "s",
            *p50_p99("tristage:kv_transfer_seconds"),
        ),
        panel(
            "Transfer failures / s",
            "Failed or timed-out KV transfers, and the requests whose decode worker recomputed the prefill instead.",
            "short",
            target(f"sum({rate('tristage:kv_transfer_failures_total')})", "failures"),
            target(f"sum({rate('tristage:kv_transfer_fallbacks_total')})", "fallbacks"),
        ),
        panel(
            "Migrations / s",
            "Requests moved from one worker to another while running.",
            "short",
            target(f"sum({rate('tristage:request_migrations_total')})", "migrations"),
        ),
        panel(
            "Waiting for decode KV room",
            "Requests the gateways hold until a decode worker has KV room for them (now), and how many a second "
            "start waiting.",
            "short",
            target("sum(tristage:requests_waiting_for_kv_room)", "waiting"),
            target(f"sum({rate('tristage:kv_room_waits_total')})", "waits / s"),
        ),
    ]


def kv_tiers() -> list[TimeSeries]:
    return [
        panel(
            "Device KV usage",
            "Fraction of each engine worker's device KV-cache blocks in use.",
            "percentunit",
            target(f"max by (worker) (vllm:kv_cache_usage_perc{{{MODEL}}})", "{{worker}}"),
            valueMin=0,
            valueMax=1,
        ),
        panel(
            "Host KV usage",
            "Fraction of each worker's host KV tier (--kv-offloading-size) holding KV blocks.",
            "percentunit",
            target(f"max by (worker) (tristage:kv_host_usage_perc{{{MODEL}}})", "{{worker}}"),
            valueMin=0,
            valueMax=1,
        ),
        panel(
            "Host tier bytes / s",
            "KV bytes copied from the device to the host tier (offloaded) and back (onloaded), per worker.",
            "Bps",
            target(f"sum by (worker) ({rate('tristage:kv_offloaded_bytes_total')})", "offloaded {{worker}}"),
            target(f"sum by (worker) ({rate('tristage:kv_onloaded_bytes_total')})", "onloaded {{worker}}"),
        ),
        panel(
            "Host-tier hit tokens / s",
            "Prompt tokens restored from the host tier instead of recomputed, per worker.",
            "short",
            target(f"sum by (worker) ({rate('tristage:kv_host_hit_tokens_total')})", "{{worker}}"),
        ),
        panel(
            "Admissions held by the SLO / s",
            "Prefill chunks the scheduler held back to keep running decodes within the TPOT SLO, per worker.",
            "short",
            target(f"sum by (worker) ({rate('tristage:slo_held_admissions_total')})", "{{worker}}"),
        ),
    ]


def router() -> list[TimeSeries]:
    return [
        panel(
            "Router decisions / s",
            "Placements by policy and by the reason the policy gave.",
            "short",
            target(f"sum by (policy, reason) ({rate('tristage:router_decisions_total')})", "{{policy}} / {{reason}}"),
        ),
        panel(
            "Prefix hit rate: predicted vs observed",
            "Prompt tokens the router expected to find cached, and "
            "those the workers found, as a share of all prompt tokens.",
            "percentunit",
            target(ratio("tristage:router_predicted_hit_tokens_total", "vllm:prompt_tokens_total"), "predicted"),
            target(ratio("tristage:router_observed_hit_tokens_total", "vllm:prompt_tokens_total"), "observed"),
            valueMin=0,
            valueMax=1,
        ),
        panel(
            "Load imbalance",
            "The router's view of load imbalance between workers of a pool.",
            "short",
            target(f"max(tristage:router_load_imbalance{{{MODEL}}})", "imbalance"),
        ),
    ]


ROWS = (
    ("Overview", overview),
    ("TTFT breakdown", ttft_breakdown),
    ("Encode", encode),
    ("Prefill", prefill),
    ("Decode", decode),
    ("Transfers", transfers),
    ("KV tiers (LayerKV)", kv_tiers),
    ("Router", router),
)


def laid_out() -> list:
    """Rows and their panels with grid positions: a row header, then three panels to a line."""
    panels: list = []
    y = 0
    for title, build in ROWS:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        row = build()
        for i, p in enumerate(row):
            p.gridPos = GridPos(h=PANEL_HEIGHT, w=PANEL_WIDTH, x=(i % 3) * PANEL_WIDTH, y=y + (i // 3) * PANEL_HEIGHT)
        y += -(-len(row) // 3) * PANEL_HEIGHT
        panels.extend(row)
    return panels


def custom_variable(name: str, label: str, choices: tuple[str, ...], default: str) -> Template:
    return Template(name=name, label=label, type="custom", query=",".join(choices), default=default)


def templating() -> Templating:
    return Templating(
        list=[
            Template(name="datasource", label="Data source", type="datasource", query="prometheus", default=""),
            Template(
                name="model_name",
                label="Model",
                dataSource=DATASOURCE,
                query="label_values(vllm:e2e_request_latency_seconds_count, model_name)",
                includeAll=True,
                multi=True,
                allValue=".*",
                default="$__all",
                refresh=2,
            ),
            custom_variable("ttft_slo", "TTFT SLO (s)", TTFT_SLO_CHOICES_S, "1"),
            custom_variable("itl_slo", "ITL SLO (s)", ITL_SLO_CHOICES_S, "0.05"),
        ]
    )


def dashboard() -> Dashboard:
    return Dashboard(
        title="tristage",
        uid=DASHBOARD_UID,
        tags=["tristage", "llm-serving"],
        description="tristage: an OpenAI-compatible cluster with encode, prefill and decode pools.",
        panels=laid_out(),
        templating=templating(),
        time=Time("now-1h", "now"),
        refresh="10s",
        timezone="browser",
        graphTooltip=1,
    ).auto_panel_ids()


def render() -> str:
    """The dashboard's JSON text, stable from run to run (sorted keys, two-space indent)."""
    from grafanalib._gen import DashboardEncoder

    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    text = render()
    stale = [path for path in OUTPUTS if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(REPO_ROOT)} is out of date: run python deploy/grafana/dashboards.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
