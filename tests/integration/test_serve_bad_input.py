"""The gateway's bad-input matrix against a real cluster (with an API key): nothing reaches a 500,
every error has OpenAI's shape, and the cluster is idle afterwards."""

import httpx
import pytest

from tests.integration.cluster import ServeProcess
from tests.unit.test_gateway_bad_input import CASES, _discover, check_case

API_KEY = "integration-key"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    proc = ServeProcess("--api-key", API_KEY, cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        yield _discover(proc.base_url, API_KEY, 16 * 2**20)
        metrics = httpx.get(proc.base_url + "/metrics").text
        assert "vllm:num_requests_running" in metrics
    finally:
        assert proc.stop() == 0
        assert proc.leftover_processes() == []


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_on_a_real_cluster(target, case):
    check_case(target, case)
