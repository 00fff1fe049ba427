"""tristage-loadgen end to end against the fake server: files, keys and plots of each command."""

import json
import subprocess
import sys

import pytest

from loadgen.cli import main
from loadgen.fake_server import FakeServerConfig, serve_in_thread

STATS = ("mean", "p50", "p90", "p99")
COMMON = ["--input-len", "16", "--output-len", "8", "--no-progress", "--time-limit", "20"]


@pytest.fixture(scope="module")
def fake():
    with serve_in_thread(FakeServerConfig(0.02, 0.002, failure_pattern=("",) * 9 + ("http-500",))) as server:
        yield server


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_writes_summary_results_and_plot(fake, tmp_path):
    out = tmp_path / "run1"
    assert (
        main(
            [
                "run",
                "--base-url",
                fake.base_url,
                "--model",
                "fake",
                "--workload",
                "random",
                "--num-requests",
                "20",
                "--rate",
                "100",
                "--slo",
                "ttft=2s,tpot=50ms",
                "--out",
                str(out),
                *COMMON,
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ttft", "itl", "tpot", "e2e"):
        assert all(isinstance(summary[key][stat], float) for stat in STATS)
    assert summary["completed"] == 18 and summary["errors"] == {"http_5xx": 2}
    assert summary["request_throughput"] > 0 and summary["output_token_throughput"] > 0
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert summary["ttft"]["p50"] == pytest.approx(0.02, abs=0.02)
    assert summary["model"] == "fake" and summary["arrivals"] == "poisson at 100 req/s"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 20 and "slo_met" in json.loads(lines[0])
    _png(out / "latency_cdf.png")


def test_compare_sweep_and_report(fake, tmp_path):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--target",
                f"a={fake.base_url}",
                "--target",
                f"b={fake.base_url}/v1",
                "--workload",
                "shared-prefix",
                "--prefix-len",
                "32",
                "--suffix-len",
                "8",
                "--num-groups",
                "3",
                "--num-requests",
                "10",
                "--concurrency",
                "4",
                "--out",
                str(out),
                *COMMON,
            ]
        )
        == 0
    )
    compared = json.loads((out / "compare.json").read_text())
    assert list(compared) == ["a", "b"] and compared["a"]["arrivals"] == "closed loop, concurrency 4"
    assert compared["a"]["model"] == "fake"  # from GET /v1/models
    assert (out / "a" / "summary.json").exists() and (out / "b" / "results.jsonl").exists()
    _png(out / "compare.png")
    _png(out / "latency_cdf.png")

    sweep = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--base-url",
                fake.base_url,
                "--rates",
                "50,200",
                "--num-requests",
                "10",
                "--endpoint",
                "completions",
                "--out",
                str(sweep),
                *COMMON,
            ]
        )
        == 0
    )
    points = json.loads((sweep / "sweep.json").read_text())
    assert [p["rate"] for p in points] == [50.0, 200.0]
    assert (sweep / "rate-50" / "summary.json").exists()
    _png(sweep / "sweep.png")

    report = tmp_path / "report"
    assert main(["report", str(out / "a"), str(sweep / "rate-200"), "--out", str(report)]) == 0
    assert list(json.loads((report / "compare.json").read_text())) == ["a", "rate-200"]
    _png(report / "compare.png")


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "loadgen", "run", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--workload" in done.stdout and "--slo" in done.stdout


def test_argument_checks(fake):
    with pytest.raises(SystemExit):
        main(["run", "--base-url", fake.base_url, "--workload", "multimodal", "--endpoint", "completions"])
    with pytest.raises(SystemExit):
        main(["run", "--base-url", fake.base_url, "--workload", "trace"])
    with pytest.raises(SystemExit):
        main(["run", "--target", f"a={fake.base_url}", "--target", f"b={fake.base_url}"])
