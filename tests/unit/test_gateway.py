"""The gateway end to end over loopback: the real app under uvicorn, a deterministic fake backend,
driven by the official `openai` client (sync and async) and by raw httpx for exact SSE shapes.

`FakeBackend` and `running_server` are also used by test_gateway_bad_input.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import transformers
import uvicorn

from services.common.codec import MessageCodec
from services.common.messages import (
    CompletionDelta,
    GenerateRequest,
    PositionLogprobs,
    RequestDelta,
    RequestError,
    SamplingSpec,
    TokenLogprob,
    WorkerInbound,
)
from services.gateway.app import create_app
from services.gateway.backend import ClusterStats, RequestFailed, WorkerSnapshot
from services.gateway.config import GatewayConfig
from services.gateway.http_server import uvicorn_options
from services.gateway.tokenizer_pool import TokenizerPool

MODEL = "fake-model"
API_KEY = "sk-test-key"
STOP_TOKEN_ID = 7  # the fake stops on it at step 2 when it is in stop_token_ids
STOP_WORD = "halt"  # ... or when this is among the stop strings
FIRST_TOKEN_ID = 100


# ----------------------------------------------------------------------------------------------
# Fake backend


def _word(index: int) -> str:
    return f" w{index}"  # the text every token of choice `index` decodes to


class FakeBackend:
    """Deterministic: each step every choice gains one token (`_word(index)`) until max_tokens."""

    def __init__(self, tokenizer, max_model_len: int = 256, vocab_size: int = 1024) -> None:
        self.model_name = MODEL
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.processor = None  # a text model
        self.reset()

    def reset(self) -> None:
        self.ready = True
        self.token_delay_s = 0.0  # sleep before each step, the first included
        self.fail_with: RequestError | None = None  # raised before the first delta
        self.fail_after_steps: int | None = None  # raise `mid_stream_error` after this many steps
        self.mid_stream_error: Exception = RuntimeError("worker lost")
        self.requests: list[tuple[str, list[int], SamplingSpec, str | None]] = []
        self.aborted: list[str] = []

    def is_ready(self) -> bool:
        return self.ready

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        cache_salt: str | None = None,
        images=(),
    ):
        self.requests.append((request_id, list(prompt_token_ids), sampling, cache_salt))
        if self.fail_with is not None:
            raise RequestFailed(self.fail_with)
        num_steps = sampling.max_tokens or self.max_model_len - len(prompt_token_ids)
        stops = STOP_TOKEN_ID in sampling.stop_token_ids or STOP_WORD in sampling.stop
        for step in range(num_steps):
            await asyncio.sleep(self.token_delay_s)
            if step == self.fail_after_steps:
                raise self.mid_stream_error
            stop = stops and step == 2
            last = stop or step == num_steps - 1
            completions = [self._completion(i, step, sampling, stop, last) for i in range(sampling.n)]
            yield RequestDelta(
                request_id=request_id,
                completions=completions,
                finished=last,
                num_prompt_tokens=len(prompt_token_ids),
                num_cached_tokens=3,
            )
            if last:
                return

    def _completion(self, index: int, step: int, sampling: SamplingSpec, stop: bool, last: bool) -> CompletionDelta:
        token_id = STOP_TOKEN_ID if stop else FIRST_TOKEN_ID + step
        text = "" if stop else _word(index)
        logprobs = None
        if sampling.logprobs is not None:
            top = [TokenLogprob(token_id + k + 1, f" alt{k}", -1.0 - k) for k in range(sampling.logprobs)]
            logprobs = [PositionLogprobs(sampled=TokenLogprob(token_id, text, -0.5), top=top)]
        finish_reason = ("stop" if stop else "length") if last else None
        stop_reason = STOP_TOKEN_ID if stop else None
        return CompletionDelta(
            index=index,
            token_ids=[token_id],
            text=text,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def cluster_stats(self) -> ClusterStats:
        return ClusterStats(migrations=1, decisions={("preble", "explore"): 2})

    async def snapshot(self) -> list[WorkerSnapshot]:
        return [
            WorkerSnapshot(
                worker="decode-0",
                stage="decode",
                num_running=2,
                num_waiting=1,
                kv_cache_usage=0.25,
                num_preemptions=4,
                prefix_cache_queried_tokens=100,
                prefix_cache_hit_tokens=40,
                phase_seconds=(("queue", ((0.3, 2), (float("inf"), 3)), 1.5),),
            )
        ]


class RecordingTokenizer:
    """A real tokenizer that notes which thread tokenized."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.backend_tokenizer = tokenizer.backend_tokenizer  # the gateway's prompt length bound reads it
        self.threads: list[str] = []

    def apply_chat_template(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer.encode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer.decode(*args, **kwargs)

    def convert_ids_to_tokens(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer.convert_ids_to_tokens(*args, **kwargs)


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve `app` under uvicorn, with the connection limits `tristage serve` applies, on a free loopback
    port in a background thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **uvicorn_options(app))
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def counters_are_zero(app) -> bool:
    admission = app.state.admission
    counters = (
        admission.num_queued_requests,
        admission.num_queued_sequences,
        admission.num_queued_prompt_bytes,
        admission.num_queued_tokens,
        admission.num_in_flight,
    )
    return counters == (0, 0, 0, 0, 0)


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def gateway(hf_tokenizer):
    """(app, backend, base_url) with authentication on; the fake is reset before each test."""
    backend = FakeBackend(RecordingTokenizer(hf_tokenizer))
    app = create_app(GatewayConfig(served_model_name=MODEL, api_keys=("other-key", API_KEY)), backend)
    with running_server(app) as base_url:
        yield app, backend, base_url


@pytest.fixture
def served(gateway):
    app, backend, base_url = gateway
    backend.reset()
    yield app, backend, base_url
    wait_until(lambda: counters_are_zero(app))


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[2]}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[2], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        yield http


def sse_payloads(response: httpx.Response) -> list:
    """Every `data:` payload of an SSE response, JSON-decoded except the final "[DONE]"."""
    payloads = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


# ----------------------------------------------------------------------------------------------
# Non-streaming


def test_models_and_probes(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200


def test_chat_non_streaming(client, served, hf_tokenizer):
    _, backend, _ = served
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert reply.id.startswith("chatcmpl-") and len(reply.id) == len("chatcmpl-") + 32
    assert reply.object == "chat.completion" and reply.model == MODEL
    [choice] = reply.choices
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", _word(0) * 4)
    assert choice.finish_reason == "length" and choice.logprobs is None
    expected_prompt = hf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    request_id, prompt, _sampling, salt = backend.requests[-1]
    assert request_id == reply.id and prompt == expected_prompt and salt is None
    assert reply.usage.prompt_tokens == len(expected_prompt)
    assert (reply.usage.completion_tokens, reply.usage.total_tokens) == (4, len(expected_prompt) + 4)
    assert reply.usage.prompt_tokens_details.cached_tokens == 3
    assert backend.tokenizer.threads == ["tokenizer_0"]  # never on the event loop thread


def test_text_parts_are_joined(client, served):
    _, backend, _ = served
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=1)
    joined = backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say\nhello"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert backend.requests[-1][1] == joined


def test_sampling_fields_reach_the_backend(client, served):
    _, backend, _ = served
    client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=50,
        max_completion_tokens=5,
        n=2,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop="x",
        logprobs=True,
        top_logprobs=3,
        user="u1",
        logit_bias={"50": 10, "7": -100},
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "min_tokens": 2,
            "stop_token_ids": [9],
            "cache_salt": "tenant-a",
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        },
    )
    _, _, sampling, salt = backend.requests[-1]
    assert sampling == SamplingSpec(
        n=2,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        stop=["x"],
        stop_token_ids=[9],
        include_stop_str_in_output=True,
        ignore_eos=True,
        max_tokens=5,
        min_tokens=2,
        logprobs=3,
        skip_special_tokens=False,
        logit_bias={50: 10.0, 7: -100.0},
    )
    assert salt == "tenant-a"


def test_defaults_reach_the_backend(client, served):
    _, backend, _ = served
    client.chat.completions.create(model=MODEL, messages=CHAT)
    sampling = backend.requests[-1][2]
    assert sampling == SamplingSpec(max_tokens=None)  # None: the backend fills the context left
    client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True)
    assert backend.requests[-1][2].logprobs == 0


def test_chat_logprobs_and_n(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.message.content == _word(choice.index) * 2
        [first, _second] = choice.logprobs.content
        assert (first.token, first.logprob, first.bytes) == (
            _word(choice.index),
            -0.5,
            list(_word(choice.index).encode()),
        )
        assert [(t.token, t.logprob) for t in first.top_logprobs] == [(" alt0", -1.0), (" alt1", -2.0)]
        assert first.top_logprobs[0].bytes == list(b" alt0")
    assert reply.usage.completion_tokens == 6


def test_stop_token(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, extra_body={"stop_token_ids": [STOP_TOKEN_ID]}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == _word(0) * 2
    assert reply.usage.completion_tokens == 3


def test_completions_token_ids_and_logprobs(client, served):
    _, backend, _ = served
    reply = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, logprobs=1, stop=[STOP_WORD])
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    [choice] = reply.choices
    assert choice.text == _word(0) * 2 and choice.finish_reason == "stop"
    assert backend.requests[-1][1] == [5, 6, 7]
    logprobs = choice.logprobs
    assert logprobs.tokens == [_word(0), _word(0), ""]
    assert logprobs.token_logprobs == [-0.5, -0.5, -0.5]
    assert logprobs.top_logprobs[0] == {_word(0): -0.5, " alt0": -1.0}
    assert logprobs.text_offset == [0, 3, 6]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 3)


def test_completions_batch(client, served, hf_tokenizer):
    _, backend, _ = served
    reply = client.completions.create(model=MODEL, prompt=["one two", "three"], max_tokens=2, n=2)
    assert [(c.index, c.text) for c in reply.choices] == [
        (0, _word(0) * 2),
        (1, _word(1) * 2),
        (2, _word(0) * 2),
        (3, _word(1) * 2),
    ]
    prompts = {request_id: prompt for request_id, prompt, _, _ in backend.requests[-2:]}
    assert prompts == {f"{reply.id}-0": hf_tokenizer.encode("one two"), f"{reply.id}-1": hf_tokenizer.encode("three")}
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts.values())
    assert reply.usage.completion_tokens == 8


# ----------------------------------------------------------------------------------------------
# Streaming


def _chunk_header(chunk: dict, obj: str) -> tuple:
    return chunk["object"] == obj, chunk["model"] == MODEL, isinstance(chunk["created"], int)


def test_chat_stream_shape(http):
    body = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(_chunk_header(c, "chat.completion.chunk") == (True, True, True) for c in chunks)
    choices = [c["choices"] for c in chunks[:-1]]
    assert choices == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": _word(0)}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": _word(0)}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    ]
    assert all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 2


def test_completion_stream_shape_without_usage(http):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(_chunk_header(c, "text_completion") == (True, True, True) for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": _word(0), "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": _word(0), "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
    ]


def test_completion_stream_logprobs_offsets(http):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": True, "logprobs": 0}
    with http.stream("POST", "/v1/completions", json=body) as response:
        chunks = sse_payloads(response)[:-1]
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks if c["choices"][0]["logprobs"]]
    assert offsets == [[0], [3]]


def test_async_client_stream_n_and_usage(served):
    asyncio.run(_async_client_stream_n_and_usage(served[2]))


async def _async_client_stream_n_and_usage(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
        texts, finish, roles, usage, logprob_tokens = {0: "", 1: ""}, {}, [], None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.index)
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
                if choice.logprobs:
                    logprob_tokens += len(choice.logprobs.content)
    assert roles == [0, 1]
    assert texts == {0: _word(0) * 3, 1: _word(1) * 3}
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 6 and logprob_tokens == 6


def test_sync_client_completion_stream(client):
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="hi", max_tokens=4, stream=True)
        if c.choices
    )
    assert text == _word(0) * 4


@pytest.mark.parametrize("stream", [False, True])
def test_a_cluster_refusal_is_answered_in_openai_terms_with_retry_after(served, http, stream):
    _, backend, _ = served
    backend.fail_with = RequestError(
        request_id="x",
        message="no worker can take this request now; retry later",
        type="service_unavailable",
        status=503,
    )
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": stream}
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"] == {
        "message": "no worker can take this request now; retry later",
        "type": "server_error",
        "param": None,
        "code": "service_unavailable",
    }


def test_a_worker_error_mid_stream_has_openai_s_type_and_the_worker_s_label_as_code(served, http):
    _, backend, _ = served
    backend.fail_after_steps = 2
    backend.mid_stream_error = RequestFailed(
        RequestError(request_id="x", message="worker w stopped; retry", type="service_unavailable", status=503)
    )
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        payloads = sse_payloads(response)
    assert payloads[-2] == {
        "error": {
            "message": "worker w stopped; retry",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
    }


def test_error_mid_stream(served, http, client):
    _, backend, _ = served
    backend.fail_after_steps = 2
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    assert payloads[-2] == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert [c["choices"][0]["delta"] for c in payloads[:-2]] == [
        {"role": "assistant", "content": ""},
        {"content": _word(0)},
        {"content": _word(0)},
    ]
    backend.mid_stream_error = RequestFailed(
        RequestError(request_id="x", message="worker lost", type="server_error", status=503)
    )
    with pytest.raises(openai.APIError, match="worker lost"):
        for _ in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, stream=True):
            pass


# ----------------------------------------------------------------------------------------------
# Errors through the client's own exception classes


def test_client_exceptions(client, served):
    _, backend, base_url = served
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    wrong_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    backend.fail_with = RequestError(request_id="x", message="no decode worker", type="server_error", status=503)
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    assert unavailable.value.status_code == 503
    backend.fail_with = RequestError(request_id="x", message="bad salt", param="cache_salt", status=400)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="hi")
    assert refused.value.body["param"] == "cache_salt"
    backend.fail_with, backend.fail_after_steps = None, 0  # the backend breaks: still the OpenAI shape
    with pytest.raises(openai.InternalServerError) as crashed:
        client.chat.completions.create(model=MODEL, messages=CHAT)
    assert crashed.value.status_code == 500 and crashed.value.body["type"] == "server_error"
    assert not backend.aborted or all(r.startswith(("chatcmpl-", "cmpl-")) for r in backend.aborted)


def test_not_ready(client, served, http):
    _, backend, _ = served
    backend.ready = False
    assert http.get("/ready").status_code == 503
    assert http.get("/health").status_code == 200
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model=MODEL, messages=CHAT)
    assert unavailable.value.status_code == 503
    assert unavailable.value.response.headers["retry-after"] == "1"


# ----------------------------------------------------------------------------------------------
# Disconnects, admission, limits


def test_disconnect_mid_stream_aborts(served, http):
    app, backend, _ = served
    backend.token_delay_s = 0.02
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        while not next(lines).startswith('data: {"id"'):
            pass
        assert app.state.admission.num_in_flight == 1
    request_id = backend.requests[-1][0]
    wait_until(lambda: request_id in backend.aborted)
    wait_until(lambda: counters_are_zero(app))


def test_disconnect_while_waiting_aborts(served, http):
    app, backend, _ = served
    backend.token_delay_s = 0.02
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=0.3)
    request_id = backend.requests[-1][0]
    wait_until(lambda: request_id in backend.aborted)
    wait_until(lambda: counters_are_zero(app))
    # also before the first token of a stream
    backend.token_delay_s = 5.0
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={**body, "stream": True}, timeout=0.3)
    request_id = backend.requests[-1][0]
    wait_until(lambda: request_id in backend.aborted)
    wait_until(lambda: counters_are_zero(app))


@pytest.fixture
def tiny_limits(hf_tokenizer):
    backend = FakeBackend(hf_tokenizer)
    config = GatewayConfig(
        served_model_name=MODEL, max_queued_requests=1, max_queued_tokens=40, retry_after_s=3, max_body_bytes=2000
    )
    app = create_app(config, backend)
    with running_server(app) as base_url:
        yield app, backend, base_url
        wait_until(lambda: counters_are_zero(app))


def test_admission_429(tiny_limits):
    asyncio.run(_admission_429(*tiny_limits))


async def _admission_429(app, backend, base_url) -> None:
    backend.token_delay_s = 2.0  # the first token takes a while: requests stay queued (even on a loaded machine)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        first = asyncio.create_task(client.completions.create(model=MODEL, prompt=[1] * 30, max_tokens=2))
        while app.state.admission.num_queued_requests == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        assert refused.value.response.headers["retry-after"] == "3"
        assert refused.value.body["type"] == "rate_limit_error"
        assert (await first).choices[0].text == _word(0) * 2
    assert counters_are_zero(app)
    metrics = httpx.get(f"{base_url}/metrics").text
    assert 'tristage:admission_rejections_total{model_name="fake-model",reason="requests"} 1.0' in metrics


def test_admission_429_on_tokens(tiny_limits):
    asyncio.run(_admission_429_on_tokens(*tiny_limits))


async def _admission_429_on_tokens(app, backend, base_url) -> None:
    app.state.admission.max_queued_requests = 10
    backend.token_delay_s = 2.0  # the first request stays queued while the second arrives, even on a loaded machine
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        first = asyncio.create_task(client.completions.create(model=MODEL, prompt=[1] * 30, max_tokens=1))
        while app.state.admission.num_queued_tokens == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(model=MODEL, prompt=[1] * 20, max_tokens=1)
        await first
    # alone, a prompt above the whole token budget is still served
    reply = await asyncio.to_thread(
        httpx.post, f"{base_url}/v1/completions", json={"model": MODEL, "prompt": [1] * 50, "max_tokens": 1}
    )
    assert reply.status_code == 200


def test_body_limit_streamed_without_length(tiny_limits):
    _, _, base_url = tiny_limits

    def body():
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    reply = httpx.post(f"{base_url}/v1/completions", content=body(), headers={"Content-Type": "application/json"})
    assert "content-length" not in reply.request.headers
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


def test_metrics(served, client, http):
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    text = http.get("/metrics").text
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "tristage:gateway_requests_in_flight",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ):
        assert name in text, name
    assert 'vllm:request_success_total{finished_reason="length",model_name="fake-model"}' in text
    labels = 'model_name="fake-model",stage="decode",worker="decode-0"'
    assert f"vllm:prefix_cache_hits_total{{{labels}}} 40.0" in text
    assert f"vllm:kv_cache_usage_perc{{{labels}}} 0.25" in text
    assert f'vllm:request_queue_time_seconds_bucket{{le="0.3",{labels}}} 2.0' in text
    assert f"vllm:request_queue_time_seconds_count{{{labels}}} 3.0" in text
    assert 'tristage:request_migrations_total{model_name="fake-model"} 1.0' in text
    assert 'tristage:router_decisions_total{model_name="fake-model",policy="preble",reason="explore"} 2.0' in text
    assert 'tristage:gateway_requests_in_flight{model_name="fake-model"} 0.0' in text


def test_per_request_histograms(served, client, http):
    """vLLM V1's per-request histograms: one observation per engine request, n and max_tokens as asked."""
    before = http.get("/metrics").text
    client.completions.create(model=MODEL, prompt=["one two", "three"], max_tokens=4, n=2)
    text = http.get("/metrics").text

    def count(name: str, page: str) -> float:
        line = next((row for row in page.splitlines() if row.startswith(f"{name}_count")), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    for name, added in (
        ("vllm:request_prompt_tokens", 2),  # two prompts: two engine requests
        ("vllm:request_generation_tokens", 2),
        ("vllm:request_time_per_output_token_seconds", 2),  # 4 tokens each: a mean after the first
        ("vllm:request_params_n", 2),
        ("vllm:request_params_max_tokens", 2),
    ):
        assert count(name, text) - count(name, before) == added, name
    assert 'vllm:request_params_n_bucket{le="2.0",model_name="fake-model"}' in text
    assert "vllm:time_per_output_token_seconds_bucket" in text


# ----------------------------------------------------------------------------------------------
# Hardening: bounds, cheap length check, Content-Type, body timeout, protected metrics and docs


def test_extreme_accepted_values_encode(client, served):
    """The largest values the gateway accepts still fit the worker message (msgpack: 64-bit integers)."""
    _, backend, _ = served
    client.completions.create(
        model=MODEL,
        prompt=[1, 1023],
        max_tokens=1,
        seed=-(2**63),
        extra_body={"top_k": 2**31 - 1, "stop_token_ids": [1023] * 1024, "min_tokens": 1},
    )
    _, prompt, sampling, _ = backend.requests[-1]
    codec: MessageCodec[WorkerInbound] = MessageCodec(WorkerInbound)
    message = GenerateRequest(request_id="r", prompt_token_ids=prompt, sampling=sampling, reply_to="inproc://r")
    assert codec.decode(codec.encode(message)) == message


def test_huge_prompts_do_not_stall_a_small_request(served):
    asyncio.run(_huge_prompts_do_not_stall_a_small_request(*served))


async def _huge_prompts_do_not_stall_a_small_request(app, backend, base_url) -> None:
    huge = json.dumps({"model": MODEL, "prompt": "word " * 3_000_000}).encode()  # 15 MB, under the 16 MiB limit
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        large = [asyncio.create_task(http.post("/v1/completions", content=huge)) for _ in range(4)]
        await asyncio.sleep(0.05)  # the uploads are under way
        start = time.monotonic()
        small = await http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        elapsed_s = time.monotonic() - start
        replies = await asyncio.gather(*large)
    assert small.status_code == 200 and small.json()["choices"][0]["text"] == _word(0) * 2
    # tokenizing one such prompt alone takes seconds; refused by length, none is tokenized
    assert elapsed_s < 3.0, elapsed_s
    for reply in replies:
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["code"] == "context_length_exceeded", error
        assert error["param"] == "prompt" and "characters long" in error["message"]
    assert len(backend.requests) == 1


def test_json_with_charset_is_accepted(http):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    reply = http.post("/v1/completions", content=body, headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert reply.status_code == 200, reply.text


def test_stalled_upload_gets_408_and_is_closed(hf_tokenizer):
    app = create_app(GatewayConfig(served_model_name=MODEL, body_read_timeout_s=0.3), FakeBackend(hf_tokenizer))
    with running_server(app) as base_url:
        host, port = base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"model": ')  # ... and nothing more
            start = time.monotonic()
            received = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                received += chunk
            assert time.monotonic() - start < 3.0
        status_line, _, rest = received.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout", received
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        wait_until(lambda: counters_are_zero(app))


def test_metrics_and_docs_open_by_default(served):
    base_url = served[2]
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert httpx.get(base_url + path).status_code == 200, path


def test_protect_metrics_and_docs(hf_tokenizer):
    config = GatewayConfig(served_model_name=MODEL, api_keys=(API_KEY,), protect_metrics_and_docs=True)
    with running_server(create_app(config, FakeBackend(hf_tokenizer))) as base_url:
        for path in ("/metrics", "/openapi.json", "/docs"):
            refused = httpx.get(base_url + path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", path
            allowed = httpx.get(base_url + path, headers={"Authorization": f"Bearer {API_KEY}"})
            assert allowed.status_code == 200, path
        assert httpx.get(base_url + "/health").status_code == 200  # probes stay open


def test_tokenizer_threads_each_have_their_own_tokenizer(hf_tokenizer):
    pool = TokenizerPool(hf_tokenizer, None, num_threads=2)
    both_busy = threading.Barrier(2)

    def encode(tokenizer, text: str) -> tuple[int, list[int]]:
        both_busy.wait(5)  # two tasks at once: two threads
        return id(tokenizer), tokenizer.encode(text)

    async def run_two():
        return await asyncio.gather(*(pool.run_with_tokenizer(encode, "Say hello") for _ in range(2)))

    try:
        (first_id, first_ids), (second_id, second_ids) = asyncio.run(run_two())
    finally:
        pool.shutdown()
    assert id(hf_tokenizer) in (first_id, second_id) and first_id != second_id  # the original, and a copy
    assert first_ids == second_ids == hf_tokenizer.encode("Say hello")


@pytest.mark.parametrize(
    "field, value",
    [
        ("guided_json", None),
        ("prompt_logprobs", None),
        ("add_generation_prompt", True),
        ("modalities", ["text"]),
        ("metadata", {"a": "b"}),  # other unknown fields leave the answer alone: accepted
        ("service_tier", "auto"),
    ],
)
def test_refusable_fields_at_their_harmless_values_and_other_unknown_fields_are_accepted(http, field, value):
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], field: value}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


# ----------------------------------------------------------------------------------------------
# vLLM's /tokenize, /detokenize and /version; /v1/models/{model}


def test_tokenize_a_prompt_as_completions_tokenize_it(served, http, hf_tokenizer):
    _, backend, _ = served
    backend.tokenizer.threads.clear()
    reply = http.post("/tokenize", json={"model": MODEL, "prompt": "one two three"})
    assert reply.status_code == 200, reply.text
    tokens = hf_tokenizer.encode("one two three")
    assert reply.json() == {"count": len(tokens), "max_model_len": 256, "tokens": tokens, "token_strs": None}
    http.post("/v1/completions", json={"model": MODEL, "prompt": "one two three", "max_tokens": 1})
    assert backend.requests[-1][1] == tokens  # what the generation path tokenized
    with_strs = http.post("/tokenize", json={"prompt": "one two three", "return_token_strs": True}).json()
    assert with_strs["tokens"] == tokens  # no model: the served one, as in vLLM
    assert with_strs["token_strs"] == hf_tokenizer.convert_ids_to_tokens(tokens)
    assert all(name.startswith("tokenizer_") for name in backend.tokenizer.threads)  # never on the event loop


def test_tokenize_messages_as_the_chat_tokenizes_them(served, http, client, hf_tokenizer):
    _, backend, _ = served
    reply = http.post("/tokenize", json={"model": MODEL, "messages": CHAT})
    assert reply.status_code == 200, reply.text
    tokenized = reply.json()
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert tokenized["count"] == chat.usage.prompt_tokens == len(tokenized["tokens"])
    assert tokenized["tokens"] == backend.requests[-1][1]
    without_prompt = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert without_prompt["tokens"] == hf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=False, tokenize=True, return_dict=False
    )
    assert without_prompt["count"] < tokenized["count"]
    rendered = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    special = http.post("/tokenize", json={"messages": CHAT, "add_special_tokens": True}).json()
    assert special["tokens"] == hf_tokenizer.encode(rendered, add_special_tokens=True)


def test_tokenize_refuses_the_image_parts_of_a_vision_language_model(hf_tokenizer):
    backend = FakeBackend(hf_tokenizer)
    backend.processor = object()  # never called: image parts are refused before tokenizing
    with running_server(create_app(GatewayConfig(served_model_name=MODEL), backend)) as base_url:
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
        reply = httpx.post(base_url + "/tokenize", json={"messages": messages})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert "/tokenize does not take image_url parts" in reply.json()["error"]["message"]


def test_detokenize_round_trip(http):
    text = "Say hello, then stop."
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]
    reply = http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert reply.status_code == 200 and reply.json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_tokenize_waits_for_admission_like_a_prompt(served, http, monkeypatch):
    app, _, _ = served
    monkeypatch.setattr(app.state.admission, "max_queued_requests", 0)  # full
    refused = http.post("/tokenize", json={"model": MODEL, "prompt": "hi"})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert http.post("/detokenize", json={"tokens": [1]}).status_code == 200  # no text to tokenize


def test_version_is_the_package_s_and_public(served):
    reply = httpx.get(served[2] + "/version")  # no key
    assert reply.status_code == 200 and reply.json() == {"version": importlib.metadata.version("tristage")}


def test_model_card(client, http):
    [listed] = client.models.list().data
    assert client.models.retrieve(MODEL) == listed
    for name in ("nope", "org/fake-model"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(name)
        assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert http.get("/v1/models/org/fake-model").json()["error"]["message"] == (
        "The model `org/fake-model` does not exist."
    )


def test_tokenizer_bodies_are_in_the_openapi_schema(http):
    schema = http.get("/openapi.json").json()

    def body(path: str) -> dict:
        return schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    ref = "#/components/schemas/"
    assert body("/tokenize") == {
        "anyOf": [{"$ref": ref + "TokenizeCompletionRequest"}, {"$ref": ref + "TokenizeChatRequest"}]
    }
    assert body("/detokenize") == {"$ref": ref + "DetokenizeRequest"}
    components = schema["components"]["schemas"]
    assert components["TokenizeCompletionRequest"]["required"] == ["prompt"]
    assert components["TokenizeChatRequest"]["required"] == ["messages"]
    assert components["DetokenizeRequest"]["required"] == ["tokens"]
    assert {"TokenizeResponse", "DetokenizeResponse", "ChatMessage"} <= set(components)
    assert {"/version", "/v1/models/{model}"} <= set(schema["paths"])
