"""Percentiles, throughput and goodput on a hand-made result set."""

import pytest

from loadgen import records
from loadgen.metrics import SLO, distribution, parse_duration_s, parse_slo, summarize
from loadgen.records import RequestResult


def _result(index, ttft_s, e2e_s, num_output_tokens=11, error_type=None, tag=""):
    ok = error_type is None
    return RequestResult(
        index=index,
        start_s=0.1 * index,
        ttft_s=ttft_s,
        itl_s=[0.01, 0.03] if ok else [],
        e2e_s=e2e_s if ok else None,
        num_input_tokens=100,
        num_output_tokens=num_output_tokens if ok else 0,
        num_content_chunks=num_output_tokens if ok else 0,
        expected_output_tokens=num_output_tokens,
        usage_reported=ok,
        usage_mismatch=False,
        error_type=error_type,
        tag=tag,
    )


# TTFT 0.1 .. 0.5 s; TPOT = (e2e - ttft) / 10 = 0.01, 0.02, 0.03, 0.04, 0.05 s
RESULTS = [
    _result(0, 0.1, 0.2),
    _result(1, 0.2, 0.4),
    _result(2, 0.3, 0.6),
    _result(3, 0.4, 0.8),
    _result(4, 0.5, 1.0),
    _result(5, None, None, error_type=records.HTTP_5XX),
    _result(6, 0.05, None, error_type=records.STREAM_ERROR),
    _result(7, None, None, error_type=records.CANCELLED),
]


def test_distribution_percentiles():
    stats = distribution([0.1, 0.2, 0.3, 0.4, 0.5])
    assert stats["count"] == 5
    assert stats["mean"] == pytest.approx(0.3) and stats["p50"] == pytest.approx(0.3)
    assert stats["p90"] == pytest.approx(0.46)  # 0.4 + 0.6 * (0.5 - 0.4): linear between order stats
    assert stats["p95"] == pytest.approx(0.48) and stats["p99"] == pytest.approx(0.496)
    assert (stats["min"], stats["max"]) == (0.1, 0.5)
    assert distribution([])["p99"] is None


def test_summary_counts_throughput_and_goodput():
    summary = summarize(RESULTS, duration_s=2.0, slo=parse_slo("ttft=350ms,tpot=0.035s"), num_not_sent=2)
    assert (summary["num_requests"], summary["completed"], summary["failed"]) == (10, 5, 2)
    assert (summary["cancelled"], summary["not_sent"]) == (1, 2)
    assert summary["errors"] == {records.HTTP_5XX: 1, records.STREAM_ERROR: 1}
    assert summary["request_throughput"] == pytest.approx(2.5)
    assert summary["output_token_throughput"] == pytest.approx(55 / 2.0)
    assert summary["input_token_throughput"] == pytest.approx(500 / 2.0)
    assert summary["goodput"] == pytest.approx(3 / 2.0)  # requests 0, 1, 2 meet both bounds
    assert summary["slo_attainment"] == pytest.approx(3 / 7)
    assert summary["ttft"]["p50"] == pytest.approx(0.3) and summary["ttft"]["count"] == 5  # completed only
    assert summary["tpot"]["mean"] == pytest.approx(0.03) and summary["tpot"]["p90"] == pytest.approx(0.046)
    assert summary["e2e"]["p99"] == pytest.approx(0.992)
    assert summary["itl"]["count"] == 10 and summary["itl"]["mean"] == pytest.approx(0.02)


def test_goodput_without_slo_is_the_request_throughput():
    summary = summarize(RESULTS, duration_s=2.0, slo=SLO())
    assert summary["goodput"] == summary["request_throughput"] == pytest.approx(2.5)


def test_slo_bounds():
    assert parse_slo("ttft=2s,tpot=50ms,e2e=10") == SLO(ttft_s=2.0, tpot_s=0.05, e2e_s=10.0)
    assert parse_duration_s("1.5e-3s") == pytest.approx(0.0015)
    slo = SLO(e2e_s=0.6)
    assert [slo.is_met(r) for r in RESULTS[:6]] == [True, True, True, False, False, False]
    one_token = _result(9, 0.1, 0.1, num_output_tokens=1)
    assert one_token.tpot_s is None and SLO(tpot_s=0.001).is_met(one_token)
    for bad in ("ttft", "latency=2s", "ttft=fast"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_breakdown_by_tag():
    tagged = [_result(0, 0.1, 0.2, tag="short"), _result(1, 0.9, 1.5, tag="long"), _result(2, 0.2, 0.3, tag="short")]
    by_tag = summarize(tagged, duration_s=1.0, slo=SLO())["by_tag"]
    assert by_tag["long"]["ttft"]["mean"] == pytest.approx(0.9)
    assert by_tag["short"]["completed"] == 2 and by_tag["short"]["ttft"]["mean"] == pytest.approx(0.15)
