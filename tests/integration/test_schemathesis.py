"""Fuzzing a live cluster from its own OpenAPI schema (schemathesis; request bodies are in the schema,
services.gateway.app._document_request_bodies): whatever a client sends, valid or not, the answer comes
within the client's timeout, is never a 5xx, and an error is in OpenAI's shape. The bodies travel the
whole path, gateway to worker and back, so a value that passes the gateway's checks but breaks a
worker message (an unbounded integer once did: a 500) fails here.

FUZZ_EXAMPLES per operation keeps the run about a minute on CI's two cores; more by hand with
TRISTAGE_FUZZ_EXAMPLES."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.cluster import serving, wait_until_idle

MODEL = "tristage-tiny"
FUZZ_EXAMPLES = int(os.environ.get("TRISTAGE_FUZZ_EXAMPLES", "60"))
REQUEST_TIMEOUT_S = 60.0
OPENAI_ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "server_error",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with serving("--mode", "colocated", cache_dir=tmp_path_factory.mktemp("cache")) as proc:
        yield proc
        wait_until_idle(proc.base_url)  # nothing a fuzzed request started is left running or holding KV


def _operations(base_url: str) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    bodies = {op.label for op in operations if op.get_request_payload_content_types()}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= bodies, bodies
    return operations


def _served_model(case: schemathesis.Case) -> schemathesis.Case:
    """Most bodies name the served model, so they get past the model check to the deeper ones and
    to the workers; the rest keep their random name (a 404)."""
    if isinstance(case.body, dict) and "model" in case.body and hash(repr(case.body)) % 8:
        case.body["model"] = MODEL
    return case


def _check(case: schemathesis.Case, statuses: Counter[int]) -> None:
    response = case.call(timeout=REQUEST_TIMEOUT_S)
    statuses[response.status_code] += 1
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["type"] in OPENAI_ERROR_TYPES, error
        assert isinstance(error["message"], str) and error["message"], error
    else:  # a stream that began 200 must not carry an error event either
        assert 'data: {"error"' not in response.text, (case.body, response.text[:500])


# Driven by hypothesis directly (schemathesis' pytest plugin does not run under this pytest): valid
# bodies (positive) and bodies that break the schema (negative), for every operation.
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=str)
def test_no_request_gets_a_server_error_or_an_answer_out_of_shape(cluster, mode):
    statuses: Counter[int] = Counter()
    for operation in _operations(cluster.base_url):
        if mode == schemathesis.GenerationMode.NEGATIVE and not operation.get_request_payload_content_types():
            continue  # nothing to break in a request without a body or parameters

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode).map(_served_model))
        def fuzz(case: schemathesis.Case) -> None:
            _check(case, statuses)

        fuzz()
    print(mode, dict(statuses))
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert statuses[200] > 0, statuses  # some generated requests were served, not only refused
