"""Two gateway replicas joined to one Ray cluster share its worker pools (as the Helm chart's gateway
Deployment does): both serve, the pools are started once, and one replica leaving does not take the
workers from the other."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.cluster import ServeProcess, metric, ray_head

MODEL = "tristage-tiny"


@pytest.fixture
def ray_cluster():
    """A Ray head in its own session (`ray start --block`), killed with its session at the end."""
    with ray_head() as address:
        yield address


def test_two_gateways_share_one_pool_and_survive_each_other(ray_cluster, tmp_path):
    args = ("--ray-address", ray_cluster, "--mode", "colocated", "--replicas", "1", "--drain-timeout", "5")
    first = ServeProcess(*args, cache_dir=tmp_path / "cache", startup_timeout_s=120)
    second = ServeProcess(
        *args, cache_dir=tmp_path / "cache", startup_timeout_s=120
    )  # attaches: no CPU is left to start another
    try:
        for gateway in (first, second):
            client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            reply = client.completions.create(
                model=MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert reply.usage.completion_tokens == 4
        # the one worker saw both gateways' requests
        text = httpx.get(second.base_url + "/metrics").text
        assert metric(text, "vllm:prompt_tokens_total") > 0
        worker_lines = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running{")]
        assert len(worker_lines) == 1 and 'worker="colocated-0"' in worker_lines[0]
        assert first.stop() == 0
        client = openai.OpenAI(base_url=second.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(
            model=MODEL, prompt="still here", max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == 3
    finally:
        for gateway in (first, second):
            gateway.stop()
