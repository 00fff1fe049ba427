"""Results on disk and on the terminal.

A run's directory:
    results.jsonl   one RequestResult per line (times in seconds), plus `slo_met`
    summary.json    loadgen.metrics.summarize() and what describes the run (target, workload,
                    arrivals, limits)
    *.png           plots (loadgen.plots)
A compare or sweep writes one such directory per run under its --out, and beside them
compare.json or sweep.json listing the runs' summaries.

Terminal tables are drawn with rich; latencies in milliseconds, on stdout. The progress bar goes
to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadgen.metrics import SLO
from loadgen.records import RequestResult

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
LATENCIES = (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E"))


def write_run(out_dir: Path, results: Iterable[RequestResult], summary: Mapping[str, Any], slo: SLO) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / RESULTS_FILE).open("w") as f:
        for result in results:
            f.write(json.dumps({**result.to_json(), "slo_met": slo.is_met(result)}) + "\n")
    write_json(out_dir / SUMMARY_FILE, summary)


def write_json(path: Path, body: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[RequestResult]]:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    with (run_dir / RESULTS_FILE).open() as f:
        results = [RequestResult.from_json(json.loads(line)) for line in f if line.strip()]
    return summary, results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _errors(summary: Mapping[str, Any]) -> str:
    parts = [f"{kind} {count}" for kind, count in sorted(summary["errors"].items())]
    if summary.get("cancelled"):
        parts.append(f"cancelled {summary['cancelled']}")
    if summary.get("not_sent"):
        parts.append(f"not sent {summary['not_sent']}")
    return ", ".join(parts) or "none"


def _goodput(summary: Mapping[str, Any]) -> str:
    slo = ", ".join(f"{k.removesuffix('_s')} <= {v * 1e3:g} ms" for k, v in summary["slo"].items())
    attained = f"{summary['slo_attainment']:.0%} within SLO ({slo})" if slo else "no SLO given"
    return f"goodput {summary['goodput']:.2f} req/s, {attained}"


def print_summary(summary: Mapping[str, Any], console: Console) -> None:
    console.print(
        f"[bold]{summary.get('target', '')}[/bold]: {summary.get('workload', {}).get('name', '')}, "
        f"{summary.get('arrivals', '')}"
    )
    table = Table()
    table.add_column("ms")
    for column in ("mean", "p50", "p90", "p95", "p99"):
        table.add_column(column, justify="right")
    for key, label in LATENCIES:
        table.add_row(label, *(_ms(summary[key][c]) for c in ("mean", "p50", "p90", "p95", "p99")))
    console.print(table)
    console.print(
        f"completed {summary['completed']}/{summary['num_requests']} in {summary['duration_s']:.1f} s; "
        f"errors: {_errors(summary)}"
    )
    console.print(
        f"{summary['request_throughput']:.2f} req/s, "
        f"{summary['output_token_throughput']:.1f} output tok/s, "
        f"{summary['total_token_throughput']:.1f} total tok/s; {_goodput(summary)}"
    )
    if summary.get("usage_mismatches"):
        console.print(
            f"[yellow]{summary['usage_mismatches']} requests streamed a number of content chunks "
            f"other than their usage.completion_tokens[/yellow]"
        )


def _compare_rows(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("completed", f"{s['completed']}/{s['num_requests']}"),
        ("errors", _errors(s)),
        ("req/s", _num(s["request_throughput"])),
        ("output tok/s", _num(s["output_token_throughput"], 1)),
        ("goodput req/s", _num(s["goodput"])),
        ("SLO attainment", f"{s['slo_attainment']:.0%}"),
    ]
    for key, label in LATENCIES:
        rows += [(f"{label} p50 ms", _ms(s[key]["p50"])), (f"{label} p99 ms", _ms(s[key]["p99"]))]
    return rows


def print_compare(summaries: Mapping[str, Mapping[str, Any]], console: Console) -> None:
    """One column per run."""
    table = Table(title="compare", title_justify="left")
    table.add_column("")
    for name in summaries:
        table.add_column(name, justify="right")
    columns = [_compare_rows(s) for s in summaries.values()]
    for i, (label, _) in enumerate(columns[0] if columns else []):
        table.add_row(label, *(column[i][1] for column in columns))
    console.print(table)


def print_sweep(points: Iterable[Mapping[str, Any]], console: Console) -> None:
    """One row per (target, rate) summary; each summary carries `target` and `rate`."""
    table = Table(title="sweep", title_justify="left")
    for column in (
        "target",
        "rate",
        "req/s",
        "out tok/s",
        "goodput",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "E2E p99",
        "errors",
    ):
        table.add_column(column, justify="left" if column in ("target", "errors") else "right")
    for s in points:
        table.add_row(
            s["target"],
            f"{s['rate']:g}",
            _num(s["request_throughput"]),
            _num(s["output_token_throughput"], 1),
            _num(s["goodput"]),
            _ms(s["ttft"]["p50"]),
            _ms(s["ttft"]["p99"]),
            _ms(s["tpot"]["p50"]),
            _ms(s["tpot"]["p99"]),
            _ms(s["e2e"]["p99"]),
            _errors(s),
        )
    console.print(table)


class ProgressBar:
    """Requests finished out of the total, with the error count; silent when disabled."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("errors {task.fields[errors]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, errors=0)
        self._errors = 0

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def advance(self, result: RequestResult) -> None:
        self._errors += not result.ok
        self._progress.update(self._task, advance=1, errors=self._errors)
