"""Admission counts sequences (n x prompts) and untokenized prompt bytes, not only requests: the
controller alone, then the gateway over loopback with a tokenizer the test holds at a gate."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import transformers

from services.common.messages import RequestError
from services.gateway.admission import AdmissionController, AdmissionRejected
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from tests.unit.test_gateway import MODEL, FakeBackend, counters_are_zero, running_server, wait_until

# ----------------------------------------------------------------------------------------------
# The controller


def _controller(requests=10, tokens=100, sequences=8, prompt_bytes=1000) -> AdmissionController:
    return AdmissionController(
        max_queued_requests=requests,
        max_queued_tokens=tokens,
        max_queued_sequences=sequences,
        max_queued_prompt_bytes=prompt_bytes,
    )


def _counters(controller: AdmissionController) -> tuple[int, int, int, int, int]:
    return (
        controller.num_queued_requests,
        controller.num_queued_sequences,
        controller.num_queued_prompt_bytes,
        controller.num_queued_tokens,
        controller.num_in_flight,
    )


def test_sequences_are_counted_and_refused_past_the_budget():
    controller = _controller(sequences=8)
    first = controller.admit(num_sequences=6)
    assert _counters(controller) == (1, 6, 0, 0, 1)
    with pytest.raises(AdmissionRejected) as refused:
        controller.admit(num_sequences=3)
    assert refused.value.reason == "sequences"
    assert _counters(controller) == (1, 6, 0, 0, 1)  # a refusal takes nothing
    second = controller.admit(num_sequences=2)  # exactly fills the budget
    assert controller.num_queued_sequences == 8
    first.leave_queue()  # first token: the sequences leave the queue, the request stays in flight
    assert _counters(controller) == (1, 2, 0, 0, 2)
    for ticket in (first, second, first):
        ticket.release()
    assert _counters(controller) == (0, 0, 0, 0, 0)


def test_prompt_bytes_are_held_until_tokenized_then_counted_as_tokens():
    controller = _controller(prompt_bytes=1000, tokens=100)
    first = controller.admit(num_sequences=1, num_prompt_bytes=900)
    with pytest.raises(AdmissionRejected) as refused:
        controller.admit(num_sequences=1, num_prompt_bytes=200)
    assert refused.value.reason == "bytes"
    controller.admit(num_sequences=1, num_prompt_bytes=0).release()  # token ids: no text to wait for
    first.tokenized(60)  # the text is tokens now
    assert _counters(controller) == (1, 1, 0, 60, 1)
    second = controller.admit(num_sequences=1, num_prompt_bytes=200)
    assert controller.num_queued_prompt_bytes == 200
    with pytest.raises(AdmissionRejected) as refused:
        second.tokenized(50)  # 60 + 50 tokens > 100
    assert refused.value.reason == "tokens"
    assert _counters(controller) == (2, 2, 0, 60, 2)  # its bytes went back; its slot until release
    second.release()
    first.release()
    assert _counters(controller) == (0, 0, 0, 0, 0)


def test_a_request_larger_than_a_whole_budget_is_admitted_alone():
    controller = _controller(sequences=4, prompt_bytes=100, tokens=10)
    big = controller.admit(num_sequences=64, num_prompt_bytes=5000)
    with pytest.raises(AdmissionRejected):
        controller.admit(num_sequences=1)
    big.tokenized(500)  # no other tokens queued
    big.release()
    alone_again = controller.admit(num_sequences=64, num_prompt_bytes=5000)
    alone_again.release()
    assert _counters(controller) == (0, 0, 0, 0, 0)


def test_the_request_limit_still_holds():
    controller = _controller(requests=1)
    ticket = controller.admit()
    with pytest.raises(AdmissionRejected) as refused:
        controller.admit()
    assert refused.value.reason == "requests"
    ticket.release()
    ticket.release()
    assert _counters(controller) == (0, 0, 0, 0, 0)


def test_leaving_the_queue_before_tokenized_gives_the_bytes_back():
    controller = _controller()
    ticket = controller.admit(num_sequences=2, num_prompt_bytes=300)
    ticket.release()  # e.g. the tokenizer refused the prompt
    ticket.tokenized(5)  # a late call after release changes nothing
    assert _counters(controller) == (0, 0, 0, 0, 0)


# ----------------------------------------------------------------------------------------------
# The gateway


class GatedTokenizer:
    """A real tokenizer whose encode waits until the test opens `gate` (one tokenizer thread only:
    the pool would deep-copy it for a second)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.gate = threading.Event()
        self.num_waiting = 0

    def encode(self, *args, **kwargs):
        self.num_waiting += 1
        assert self.gate.wait(10), "the test never opened the gate"
        return self._tokenizer.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        assert self.gate.wait(10), "the test never opened the gate"
        return self._tokenizer.apply_chat_template(*args, **kwargs)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def gated(hf_tokenizer):
    """(app, backend, tokenizer, base_url): sequence budget 8, prompt byte budget 100."""
    tokenizer = GatedTokenizer(hf_tokenizer)
    backend = FakeBackend(tokenizer)
    config = GatewayConfig(
        served_model_name=MODEL, max_queued_sequences=8, max_queued_prompt_bytes=100, tokenizer_threads=1
    )
    app = create_app(config, backend)
    with running_server(app) as base_url:
        yield app, backend, tokenizer, base_url
        tokenizer.gate.set()
        wait_until(lambda: counters_are_zero(app))


def _post(base_url: str, body: dict, timeout_s: float = 10.0) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "max_tokens": 2, **body}, timeout=timeout_s)


def _in_background(fn, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


def _rejections(base_url: str, reason: str) -> str:
    metrics = httpx.get(f"{base_url}/metrics").text
    line = f'tristage:admission_rejections_total{{model_name="{MODEL}",reason="{reason}"}}'
    return next((row.split()[-1] for row in metrics.splitlines() if row.startswith(line)), "absent")


def test_a_batch_counts_n_times_prompts_and_its_prompt_bytes(gated):
    app, backend, tokenizer, base_url = gated
    admission = app.state.admission
    body = {"prompt": ["one", "two", "three"], "n": 2}
    thread, result = _in_background(_post, base_url, body)
    wait_until(lambda: tokenizer.num_waiting == 1)  # admitted, waiting for the tokenizer
    assert (admission.num_queued_requests, admission.num_queued_sequences) == (1, 6)
    assert admission.num_queued_prompt_bytes == len("onetwothree")
    refused = _post(base_url, {"prompt": ["x", "y"], "n": 2})  # 6 + 4 sequences > 8
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "sequences" in refused.json()["error"]["message"]
    assert _rejections(base_url, "sequences") == "1.0"
    tokenizer.gate.set()
    thread.join(10)
    assert result[0].status_code == 200 and len(result[0].json()["choices"]) == 6
    assert len(backend.requests) == 3  # one engine request per prompt
    wait_until(lambda: counters_are_zero(app))
    assert 'tristage:gateway_queued_sequences{model_name="fake-model"} 0.0' in httpx.get(f"{base_url}/metrics").text


def test_untokenized_prompt_bytes_are_refused_past_the_budget(gated):
    app, _, tokenizer, base_url = gated
    big = "word " * 30  # 150 bytes: more than the budget of 100, admitted alone
    thread, result = _in_background(_post, base_url, {"prompt": big})
    wait_until(lambda: tokenizer.num_waiting == 1)
    assert app.state.admission.num_queued_prompt_bytes == 150
    refused = _post(base_url, {"prompt": "hi"})
    assert refused.status_code == 429 and "tokenized" in refused.json()["error"]["message"]
    assert _rejections(base_url, "bytes") == "1.0"
    # token ids are no text to tokenize: admitted past a full byte budget
    ids_thread, ids_result = _in_background(_post, base_url, {"prompt": [1, 2, 3]})
    wait_until(lambda: app.state.admission.num_queued_requests == 2)
    tokenizer.gate.set()
    for waited in (thread, ids_thread):
        waited.join(10)
    assert result[0].status_code == ids_result[0].status_code == 200
    wait_until(lambda: counters_are_zero(app))


def test_counters_return_to_zero_on_errors_and_disconnects(gated):
    app, backend, tokenizer, base_url = gated
    # the client leaves while its prompts wait for the tokenizer
    with pytest.raises(httpx.ReadTimeout):
        _post(base_url, {"prompt": ["a", "b"], "n": 3}, timeout_s=0.5)
    assert app.state.admission.num_queued_sequences == 6
    tokenizer.gate.set()
    wait_until(lambda: counters_are_zero(app))
    # refused as too long for the context
    too_long = _post(base_url, {"prompt": "word " * 300, "max_tokens": 1})
    assert too_long.status_code == 400, too_long.text
    assert counters_are_zero(app)
    # the backend refuses before the first token
    backend.fail_with = RequestError(request_id="", status=503, type="service_unavailable", message="no worker")
    failed = _post(base_url, {"prompt": ["a", "b"], "n": 2})
    assert failed.status_code == 503
    wait_until(lambda: counters_are_zero(app))
    # the client leaves while waiting for the first token
    backend.fail_with = None
    backend.token_delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        _post(base_url, {"prompt": ["a", "b"], "n": 2}, timeout_s=0.5)
    start = time.monotonic()
    wait_until(lambda: counters_are_zero(app))
    assert time.monotonic() - start < 3.0
