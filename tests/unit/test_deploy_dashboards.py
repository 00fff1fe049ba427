"""The Grafana dashboard: the committed JSON is what deploy/grafana/dashboards.py generates, every
PromQL expression parses (promql-parser, a binding of the Prometheus parser's grammar) and selects
only metrics of the catalogue, and the layout covers every stage.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import promql_parser
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "deploy" / "grafana" / "dashboards.py"
COMMITTED = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "tristage.json"

# What the template variables stand for when an expression runs outside Grafana.
VARIABLE_VALUES = {
    "${ttft_slo}": "1",
    "${itl_slo}": "0.05",
    "$model_name": ".*",
    "$__rate_interval": "1m",
}

# The metrics the dashboard must show: the catalogue of vLLM-named and tristage metrics.
REQUIRED_METRICS = {
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions",
    "tristage:kv_transfer_bytes_total",
    "tristage:kv_transfer_seconds",
    "tristage:kv_transfer_failures_total",
    "tristage:kv_transfer_fallbacks_total",
    "tristage:request_migrations_total",
    "tristage:router_decisions_total",
    "tristage:router_predicted_hit_tokens_total",
    "tristage:router_observed_hit_tokens_total",
    "tristage:router_load_imbalance",
    "tristage:encode_latency_seconds",
    "tristage:embedding_cache_hits_total",
    "tristage:embedding_cache_queries_total",
    "tristage:embedding_transfer_bytes_total",
    "tristage:admission_rejections_total",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:iteration_tokens_total",
    "tristage:kv_host_usage_perc",
    "tristage:kv_offloaded_bytes_total",
    "tristage:kv_onloaded_bytes_total",
    "tristage:kv_host_hit_tokens_total",
    "tristage:slo_held_admissions_total",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("tristage_dashboards", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel, in layout order."""
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def substitute(expr: str) -> str:
    for variable, value in VARIABLE_VALUES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def selected_metrics(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def family(sample_name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if sample_name.endswith(suffix):
            return sample_name.removesuffix(suffix)
    return sample_name


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(COMMITTED.read_text())


def test_committed_json_is_what_the_generator_writes():
    generator = load_generator()
    text = generator.render()
    for path in generator.OUTPUTS:
        assert path.read_text() == text, f"{path} is stale: run python deploy/grafana/dashboards.py"
    assert generator.main(["--check"]) == 0


def test_every_expression_parses_and_reads_only_the_catalogue(dashboard):
    allowed = load_generator().sample_names()
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 30
    used: set[str] = set()
    for title, expr in expressions:
        names = selected_metrics(substitute(expr))
        assert names and names <= allowed, f"{title}: {sorted(names - allowed)} not in the catalogue"
        used |= names
    catalogue_used = {family(name) for name in used}
    missing = {
        name
        for name in REQUIRED_METRICS
        if name not in catalogue_used
        and name + "_total" not in catalogue_used
        and name.removesuffix("_total") not in catalogue_used
    }
    assert not missing, f"metrics of the catalogue with no panel: {sorted(missing)}"


def test_counter_samples_carry_total_as_prometheus_client_exposes_them(dashboard):
    """`vllm:prefix_cache_hits` is a counter family: its samples are `vllm:prefix_cache_hits_total`."""
    used = set().union(*(selected_metrics(substitute(expr)) for _, expr in dashboard_expressions(dashboard)))
    assert {"vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:num_preemptions_total"} <= used
    assert not used & {"vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:num_preemptions"}


def test_parser_rejects_broken_promql():
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(vllm:generation_tokens_total[1m])")


def test_rows_and_layout(dashboard):
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == [
        "Overview",
        "TTFT breakdown",
        "Encode",
        "Prefill",
        "Decode",
        "Transfers",
        "KV tiers (LayerKV)",
        "Router",
    ]
    cells = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert all(panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for panel in graphs)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert dashboard["uid"] == "tristage-overview"


def row_expressions(dashboard: dict, row: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of the panels laid out under one row header."""
    current, found = None, []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
        elif current == row:
            found.extend((panel["title"], target["expr"]) for target in panel["targets"])
    return found


def test_overview_has_latency_percentiles_and_goodput(dashboard):
    overview = row_expressions(dashboard, "Overview")
    exprs = [expr for _, expr in overview]
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        for q in ("0.5", "0.99"):
            prefix = f"histogram_quantile({q}, sum by (le) (rate(vllm:{histogram}_seconds_bucket"
            assert any(expr.startswith(prefix) for expr in exprs), (histogram, q)
    [goodput] = [expr for title, expr in overview if title == "Goodput"]
    assert 'le=~"${ttft_slo}' in goodput


def test_kv_tiers_row_shows_both_tiers_and_the_slo_holds(dashboard):
    exprs = [expr for _, expr in row_expressions(dashboard, "KV tiers (LayerKV)")]
    selected = set().union(*(selected_metrics(substitute(expr)) for expr in exprs))
    assert selected == {
        "vllm:kv_cache_usage_perc",
        "tristage:kv_host_usage_perc",
        "tristage:kv_offloaded_bytes_total",
        "tristage:kv_onloaded_bytes_total",
        "tristage:kv_host_hit_tokens_total",
        "tristage:slo_held_admissions_total",
    }
    assert all("by (worker)" in expr for expr in exprs)
