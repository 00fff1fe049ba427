"""PNG plots with matplotlib's Agg canvas (object API only: no pyplot, no global state).

latency_cdf.png   empirical CDFs of TTFT, ITL and E2E (ms), one line per run
compare.png       runs side by side: throughput and goodput, then p50 / p99 of TTFT, TPOT, E2E
sweep.png         against the offered rate: achieved throughput and goodput (with the line
                  y = rate), p50 / p99 TTFT and TPOT; one line per target
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loadgen.records import RequestResult

DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _cdf(axes: Axes, values_s: Sequence[float], label: str) -> None:
    if not values_s:
        return
    xs = np.sort(np.asarray(values_s)) * 1e3
    axes.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)


def _latencies_s(results: Sequence[RequestResult], panel: str) -> list[float]:
    done = [r for r in results if r.ok]
    if panel == "ITL":
        return [gap for r in done for gap in r.itl_s]
    values = [r.ttft_s if panel == "TTFT" else r.e2e_s for r in done]
    return [v for v in values if v is not None]


def plot_latency_cdfs(runs: Mapping[str, Sequence[RequestResult]], path: Path) -> Path:
    figure = Figure(figsize=(14, 4))
    for i, (panel, title) in enumerate((("TTFT", "TTFT"), ("ITL", "ITL"), ("E2E", "E2E latency"))):
        axes = figure.add_subplot(1, 3, i + 1)
        for name, results in runs.items():
            _cdf(axes, _latencies_s(results, panel), name)
        axes.set(
            title=title, xlabel="ms", ylabel="fraction of requests" if i != 1 else "fraction of gaps", ylim=(0, 1.02)
        )
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    return _save(figure, path)


def _bars(axes: Axes, names: Sequence[str], series: Mapping[str, Sequence[float]], title: str, unit: str) -> None:
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        axes.bar(positions + i * width, values, width, label=label)
    axes.set_xticks(positions + width * (len(series) - 1) / 2, names)
    axes.set(title=title, ylabel=unit)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")


def _ms_or_zero(summary: Mapping[str, Any], key: str, stat: str) -> float:
    value = summary[key][stat]
    return 0.0 if value is None else value * 1e3


def plot_compare(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    names = list(summaries)
    figure = Figure(figsize=(max(10, 2.5 * len(names) + 6), 7))
    _bars(
        figure.add_subplot(2, 2, 1),
        names,
        {
            "throughput": [s["request_throughput"] for s in summaries.values()],
            "goodput": [s["goodput"] for s in summaries.values()],
        },
        "requests per second",
        "req/s",
    )
    for i, (key, title) in enumerate((("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E latency"))):
        _bars(
            figure.add_subplot(2, 2, i + 2),
            names,
            {stat: [_ms_or_zero(s, key, stat) for s in summaries.values()] for stat in ("p50", "p99")},
            title,
            "ms",
        )
    return _save(figure, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """`points`: summaries that carry `target` and `rate`, in any order."""
    figure = Figure(figsize=(12, 8))
    throughput, goodput = figure.add_subplot(2, 2, 1), figure.add_subplot(2, 2, 2)
    ttft, tpot = figure.add_subplot(2, 2, 3), figure.add_subplot(2, 2, 4)
    targets = list(dict.fromkeys(p["target"] for p in points))
    rates = sorted({p["rate"] for p in points})
    for target in targets:
        mine = sorted((p for p in points if p["target"] == target), key=lambda p: p["rate"])
        x = [p["rate"] for p in mine]
        throughput.plot(x, [p["request_throughput"] for p in mine], marker="o", label=target)
        goodput.plot(x, [p["goodput"] for p in mine], marker="o", label=target)
        for axes, key in ((ttft, "ttft"), (tpot, "tpot")):
            axes.plot(x, [_ms_or_zero(p, key, "p50") for p in mine], marker="o", label=f"{target} p50")
            axes.plot(x, [_ms_or_zero(p, key, "p99") for p in mine], marker="x", linestyle="--", label=f"{target} p99")
    for axes in (throughput, goodput):
        axes.plot(rates, rates, color="grey", linestyle=":", label="offered rate")
    for axes, title, unit in (
        (throughput, "throughput", "req/s"),
        (goodput, "goodput (meets all SLOs)", "req/s"),
        (ttft, "TTFT", "ms"),
        (tpot, "TPOT", "ms"),
    ):
        axes.set(title=title, xlabel="offered rate (req/s)", ylabel=unit)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return _save(figure, path)
