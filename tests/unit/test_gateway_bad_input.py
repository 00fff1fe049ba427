"""Bad input, table-driven: each case asserts the status and the OpenAI error's `type` and `param`.

The target comes from the `target` fixture: by default the real app over a fake backend on loopback;
with TRISTAGE_GATEWAY_URL set (and TRISTAGE_API_KEY when the gateway has keys, TRISTAGE_MAX_BODY_BYTES
when its body limit is not the default) the same cases run against a live gateway. The served model
and its context length are read from /v1/models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import transformers

from services.gateway.app import create_app
from services.gateway.config import MIB, GatewayConfig
from tests.unit.test_gateway import API_KEY, MODEL, FakeBackend, running_server


@dataclass(frozen=True)
class Target:
    base_url: str
    api_key: str | None  # None: the gateway has no keys, the authentication cases are skipped
    model: str
    max_model_len: int
    max_body_bytes: int


def _discover(base_url: str, api_key: str | None, max_body_bytes: int) -> Target:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    [card] = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()["data"]
    return Target(base_url, api_key, card["id"], card["max_model_len"], max_body_bytes)


@pytest.fixture(scope="module")
def target(tokenizer_dir):
    max_body_bytes = int(os.environ.get("TRISTAGE_MAX_BODY_BYTES", 16 * MIB))
    if os.environ.get("TRISTAGE_GATEWAY_URL"):
        yield _discover(
            os.environ["TRISTAGE_GATEWAY_URL"].rstrip("/"), os.environ.get("TRISTAGE_API_KEY"), max_body_bytes
        )
        return
    backend = FakeBackend(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    app = create_app(
        GatewayConfig(served_model_name=MODEL, api_keys=(API_KEY,), max_body_bytes=max_body_bytes), backend
    )
    with running_server(app) as base_url:
        yield _discover(base_url, API_KEY, max_body_bytes)
        assert app.state.admission.num_in_flight == 0
        assert not backend.requests, "no bad request may reach the backend"


Body = dict[str, Any] | Callable[[Target], dict[str, Any] | bytes]


@dataclass(frozen=True)
class Case:
    name: str
    body: Body | None  # a dict is merged over the endpoint's valid base body; a callable builds the whole body
    status: int
    type: str
    param: str | None
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = "key"  # "key", "none" or "wrong"
    code: str | None = None  # checked when given
    message: str | None = None  # a substring of the message, checked when given


def _chat(target: Target, **fields) -> dict[str, Any]:
    return {"model": target.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


def _completion(target: Target, **fields) -> dict[str, Any]:
    return {"model": target.model, "prompt": "Hello", "max_tokens": 4, **fields}


def _chat_with(**fields) -> Callable[[Target], dict]:
    return lambda t: _chat(t, **fields)


def _completion_with(**fields) -> Callable[[Target], dict]:
    return lambda t: _completion(t, **fields)


def _without(builder: Callable[[Target], dict], key: str) -> Callable[[Target], dict]:
    return lambda t: {k: v for k, v in builder(t).items() if k != key}


def _message(content) -> Callable[[Target], dict]:
    return _chat_with(messages=[{"role": "user", "content": content}])


def _tokenize(**fields) -> Callable[[Target], dict]:
    return lambda t: {"model": t.model, "prompt": "Hello", **fields}


def _tokenize_chat(**fields) -> Callable[[Target], dict]:
    return lambda t: {"model": t.model, "messages": [{"role": "user", "content": "Hello"}], **fields}


def _detokenize(**fields) -> Callable[[Target], dict]:
    return lambda t: {"model": t.model, "tokens": [1, 2], **fields}


def _too_large(target: Target) -> bytes:
    filler = b"a" * (target.max_body_bytes + 1024)
    return b'{"model": "' + target.model.encode() + b'", "messages": [{"role": "user", "content": "' + filler + b'"}]}'


BAD = "invalid_request_error"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"

CASES = [
    # body and JSON
    Case("bad_json", lambda t: b'{"model": ', 400, BAD, None),
    Case("json_not_object", lambda t: b"[1, 2]", 400, BAD, None),
    Case("empty_body", lambda t: b"", 400, BAD, None),
    Case("body_too_large", _too_large, 413, BAD, None, code="request_too_large"),
    # model
    Case("missing_model", _without(_chat_with(), "model"), 400, BAD, "model"),
    Case("model_not_string", {"model": 123}, 400, BAD, "model"),
    Case("unknown_model", {"model": "no-such-model"}, 404, BAD, "model", code="model_not_found"),
    Case("unknown_model_completions", {"model": "no-such-model"}, 404, BAD, "model", path=COMPLETIONS),
    # messages
    Case("missing_messages", _without(_chat_with(), "messages"), 400, BAD, "messages"),
    Case("empty_messages", {"messages": []}, 400, BAD, "messages"),
    Case("messages_not_list", {"messages": "Hello"}, 400, BAD, "messages"),
    Case("unknown_role", {"messages": [{"role": "robot", "content": "Hi"}]}, 400, BAD, "messages"),
    Case("content_not_string", _message(123), 400, BAD, "messages"),
    Case("user_content_missing", {"messages": [{"role": "user"}]}, 400, BAD, "messages"),
    Case(
        "image_part",
        _message([{"type": "text", "text": "What is this?"}, IMAGE]),
        400,
        BAD,
        "messages",
        message="text-only and does not accept image input",
    ),
    Case(
        "audio_part",
        _message([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
        400,
        BAD,
        "messages",
    ),
    Case(
        "prompt_too_long_chat",
        lambda t: _chat(t, max_tokens=None, messages=[{"role": "user", "content": " hello" * (t.max_model_len + 10)}]),
        400,
        BAD,
        "messages",
        code="context_length_exceeded",
        message="maximum context length",
    ),
    Case(
        "prompt_too_long_large_body", _message("word " * 100_000), 400, BAD, "messages", code="context_length_exceeded"
    ),
    # sampling fields
    Case("temperature_high", {"temperature": 2.5}, 400, BAD, "temperature"),
    Case("temperature_negative", {"temperature": -0.1}, 400, BAD, "temperature"),
    Case("temperature_string", {"temperature": "hot"}, 400, BAD, "temperature"),
    Case(
        "temperature_nan",
        lambda t: json.dumps(_chat(t)).replace('"max_tokens"', '"temperature": NaN, "max_tokens"').encode(),
        400,
        BAD,
        "temperature",
    ),
    Case("top_p_zero", {"top_p": 0}, 400, BAD, "top_p"),
    Case("top_p_high", {"top_p": 1.5}, 400, BAD, "top_p"),
    Case("presence_penalty_high", {"presence_penalty": 2.5}, 400, BAD, "presence_penalty"),
    Case("frequency_penalty_low", {"frequency_penalty": -2.5}, 400, BAD, "frequency_penalty"),
    Case("n_zero", {"n": 0}, 400, BAD, "n"),
    Case("n_too_large", {"n": 100000}, 400, BAD, "n"),
    Case("n_float", {"n": 1.5}, 400, BAD, "n"),
    Case("seed_string", {"seed": "abc"}, 400, BAD, "seed"),
    Case("seed_out_of_int64", {"seed": 2**70}, 400, BAD, "seed"),
    Case("max_tokens_zero", {"max_tokens": 0}, 400, BAD, "max_tokens"),
    Case(
        "max_tokens_beyond_context",
        lambda t: _chat(t, max_tokens=t.max_model_len),
        400,
        BAD,
        "max_tokens",
        code="context_length_exceeded",
    ),
    Case("max_completion_tokens_negative", {"max_completion_tokens": -1}, 400, BAD, "max_completion_tokens"),
    Case("stream_not_bool", {"stream": "yes"}, 400, BAD, "stream"),
    Case("stream_options_without_stream", {"stream_options": {"include_usage": True}}, 400, BAD, "stream_options"),
    Case("logprobs_not_bool", {"logprobs": "yes"}, 400, BAD, "logprobs"),
    Case("top_logprobs_without_logprobs", {"top_logprobs": 2}, 400, BAD, "top_logprobs"),
    Case("top_logprobs_too_many", {"logprobs": True, "top_logprobs": 21}, 400, BAD, "top_logprobs"),
    Case("stop_too_many", {"stop": [f"s{i}" for i in range(17)]}, 400, BAD, "stop"),
    Case("stop_empty_string", {"stop": [""]}, 400, BAD, "stop"),
    Case("stop_not_string", {"stop": 5}, 400, BAD, "stop"),
    Case("logit_bias_key_not_a_token_id", {"logit_bias": {"fifty": 10}}, 400, BAD, "logit_bias"),
    Case("logit_bias_key_negative", {"logit_bias": {"-5": 10}}, 400, BAD, "logit_bias"),
    Case("logit_bias_key_out_of_vocabulary", {"logit_bias": {"99999999": 10}}, 400, BAD, "logit_bias"),
    Case("tools_not_functions", {"tools": [{"type": "retrieval"}]}, 400, BAD, "tools"),
    Case(
        "tool_choice_names_no_tool",
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        BAD,
        "tool_choice",
    ),
    # other servers' fields that would change the answer: refused by name, never ignored
    # output constraints that do not compile, or clash: refused by the client's own field
    Case("guided_json_bad_type", {"guided_json": {"type": "nosuch"}}, 400, BAD, "guided_json"),
    Case("guided_json_not_json", {"guided_json": "{nope"}, 400, BAD, "guided_json"),
    Case("guided_regex_unclosed", {"guided_regex": "[a-"}, 400, BAD, "guided_regex", path=COMPLETIONS),
    Case("guided_choice_empty", {"guided_choice": []}, 400, BAD, "guided_choice", path=COMPLETIONS),
    Case(
        "structured_outputs_two",
        {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        400,
        BAD,
        "structured_outputs",
    ),
    Case(
        "structured_outputs_unknown_key",
        {"structured_outputs": {"whitespace_pattern": " "}},
        400,
        BAD,
        "structured_outputs.whitespace_pattern",
    ),
    Case("response_format_unknown", {"response_format": {"type": "yaml"}}, 400, BAD, "response_format"),
    Case("json_schema_missing", {"response_format": {"type": "json_schema"}}, 400, BAD, "response_format.json_schema"),
    Case(
        "two_constraints",
        {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
        400,
        BAD,
        "guided_regex",
    ),
    Case("guided_whitespace_pattern", {"guided_whitespace_pattern": " *"}, 400, BAD, "guided_whitespace_pattern"),
    Case("prompt_logprobs_too_many", {"prompt_logprobs": 21}, 400, BAD, "prompt_logprobs", path=COMPLETIONS),
    Case("prompt_logprobs_streamed", {"prompt_logprobs": 1, "stream": True}, 400, BAD, "prompt_logprobs"),
    Case("add_generation_prompt_false", {"add_generation_prompt": False}, 400, BAD, "add_generation_prompt"),
    Case("audio_modality", {"modalities": ["text", "audio"]}, 400, BAD, "modalities"),
    Case("functions", {"functions": [{"name": "f"}]}, 400, BAD, "functions"),
    # vLLM's extras
    Case("top_k_below_minus_one", {"top_k": -2}, 400, BAD, "top_k"),
    Case("min_p_high", {"min_p": 1.5}, 400, BAD, "min_p"),
    Case("repetition_penalty_zero", {"repetition_penalty": 0}, 400, BAD, "repetition_penalty"),
    Case("min_tokens_above_max_tokens", {"min_tokens": 10, "max_tokens": 2}, 400, BAD, "min_tokens"),
    Case("stop_token_ids_out_of_vocab", {"stop_token_ids": [10**9]}, 400, BAD, "stop_token_ids"),
    Case("cache_salt_empty", {"cache_salt": ""}, 400, BAD, "cache_salt"),
    # completions
    Case("missing_prompt", _without(_completion_with(), "prompt"), 400, BAD, "prompt", path=COMPLETIONS),
    Case("empty_prompt", {"prompt": ""}, 400, BAD, "prompt", path=COMPLETIONS),
    Case("empty_token_list", {"prompt": []}, 400, BAD, "prompt", path=COMPLETIONS),
    Case("empty_prompt_in_batch", {"prompt": ["Hi", ""]}, 400, BAD, "prompt", path=COMPLETIONS),
    Case("token_id_out_of_vocab", {"prompt": [1, 10**9]}, 400, BAD, "prompt", path=COMPLETIONS),
    Case("token_id_negative", {"prompt": [[1, 2], [-1]]}, 400, BAD, "prompt", path=COMPLETIONS),
    Case("prompt_mixed_types", {"prompt": [1, "a"]}, 400, BAD, "prompt", path=COMPLETIONS, message="prompt[1]"),
    Case(
        "prompt_too_long",
        lambda t: _completion(t, prompt=[1] * t.max_model_len, max_tokens=None),
        400,
        BAD,
        "prompt",
        path=COMPLETIONS,
        code="context_length_exceeded",
    ),
    Case(
        "completion_max_tokens_beyond_context",
        lambda t: _completion(t, max_tokens=t.max_model_len),
        400,
        BAD,
        "max_tokens",
        path=COMPLETIONS,
    ),
    Case("completion_logprobs_too_many", {"logprobs": 21}, 400, BAD, "logprobs", path=COMPLETIONS),
    Case("completion_logprobs_bool", {"logprobs": True}, 400, BAD, "logprobs", path=COMPLETIONS),
    Case("echo_not_bool", {"echo": "yes"}, 400, BAD, "echo", path=COMPLETIONS),
    Case("suffix", {"suffix": "end"}, 400, BAD, "suffix", path=COMPLETIONS),
    Case("completion_temperature_high", {"temperature": 3}, 400, BAD, "temperature", path=COMPLETIONS),
    # authentication, routes, methods
    Case("missing_key", {}, 401, BAD, None, auth="none", code="invalid_api_key"),
    Case("wrong_key", {}, 401, BAD, None, auth="wrong", code="invalid_api_key"),
    Case("wrong_key_models", None, 401, BAD, None, path="/v1/models", method="GET", auth="wrong"),
    Case("unknown_route", {}, 404, BAD, None, path="/v1/nothing-here"),
    Case("wrong_method", None, 405, BAD, None, method="GET"),
    Case("wrong_method_models", {}, 405, BAD, None, path="/v1/models"),
    # deployment bounds, before tokenizing
    Case(
        "max_completion_tokens_beyond_context",
        lambda t: _chat(t, max_completion_tokens=t.max_model_len),
        400,
        BAD,
        "max_completion_tokens",
        code="context_length_exceeded",
    ),
    Case(
        "min_tokens_beyond_context",
        lambda t: _chat(t, max_tokens=None, min_tokens=t.max_model_len),
        400,
        BAD,
        "min_tokens",
    ),
    Case("stop_token_ids_too_many", {"stop_token_ids": [1] * 1025}, 400, BAD, "stop_token_ids"),
    Case("logit_bias_value_out_of_range", {"logit_bias": {"50": 101}}, 400, BAD, "logit_bias"),
    # Content-Type: JSON only
    Case(
        "content_type_text", {}, 415, BAD, None, headers={"Content-Type": "text/plain"}, code="unsupported_media_type"
    ),
    Case("content_type_missing", {}, 415, BAD, None, headers={"Content-Type": ""}, code="unsupported_media_type"),
    Case(
        "content_type_form",
        {},
        415,
        BAD,
        None,
        path=COMPLETIONS,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case("content_type_latin1", {}, 415, BAD, None, headers={"Content-Type": "application/json; charset=latin-1"}),
    # /tokenize (a prompt or messages), /detokenize, /v1/models/{model}
    Case("tokenize_bad_json", lambda t: b'{"prompt": ', 400, BAD, None, path=TOKENIZE),
    Case("tokenize_json_not_object", lambda t: b'["Hello"]', 400, BAD, None, path=TOKENIZE),
    Case("tokenize_missing_prompt", lambda t: {"model": t.model}, 400, BAD, "prompt", path=TOKENIZE),
    Case("tokenize_prompt_token_ids", _tokenize(prompt=[1, 2]), 400, BAD, "prompt", path=TOKENIZE),
    Case("tokenize_prompt_null", _tokenize(prompt=None), 400, BAD, "prompt", path=TOKENIZE),
    Case("tokenize_model_not_string", _tokenize(model=123), 400, BAD, "model", path=TOKENIZE),
    Case(
        "tokenize_unknown_model",
        _tokenize(model="no-such-model"),
        404,
        BAD,
        "model",
        path=TOKENIZE,
        code="model_not_found",
    ),
    Case(
        "tokenize_add_special_tokens_string",
        _tokenize(add_special_tokens="yes"),
        400,
        BAD,
        "add_special_tokens",
        path=TOKENIZE,
    ),
    Case(
        "tokenize_return_token_strs_int", _tokenize(return_token_strs=1), 400, BAD, "return_token_strs", path=TOKENIZE
    ),
    Case("tokenize_missing_key", _tokenize(), 401, BAD, None, path=TOKENIZE, auth="none", code="invalid_api_key"),
    Case("tokenize_wrong_method", None, 405, BAD, None, path=TOKENIZE, method="GET"),
    Case(
        "tokenize_content_type_text", _tokenize(), 415, BAD, None, path=TOKENIZE, headers={"Content-Type": "text/plain"}
    ),
    Case("tokenize_empty_messages", _tokenize_chat(messages=[]), 400, BAD, "messages", path=TOKENIZE),
    Case("tokenize_messages_not_list", _tokenize_chat(messages="Hello"), 400, BAD, "messages", path=TOKENIZE),
    Case(
        "tokenize_unknown_role",
        _tokenize_chat(messages=[{"role": "robot", "content": "Hi"}]),
        400,
        BAD,
        "messages",
        path=TOKENIZE,
    ),
    Case(
        "tokenize_user_content_missing",
        _tokenize_chat(messages=[{"role": "user"}]),
        400,
        BAD,
        "messages",
        path=TOKENIZE,
    ),
    Case(
        "tokenize_image_part",
        _tokenize_chat(messages=[{"role": "user", "content": [IMAGE]}]),
        400,
        BAD,
        "messages",
        path=TOKENIZE,
    ),
    Case(
        "tokenize_add_generation_prompt_string",
        _tokenize_chat(add_generation_prompt="yes"),
        400,
        BAD,
        "add_generation_prompt",
        path=TOKENIZE,
    ),
    Case("tokenize_chat_template", _tokenize_chat(chat_template="{{ x }}"), 400, BAD, "chat_template", path=TOKENIZE),
    Case(
        "tokenize_continue_final_message",
        _tokenize_chat(continue_final_message=True),
        400,
        BAD,
        "continue_final_message",
        path=TOKENIZE,
    ),
    Case("tokenize_prompt_and_messages", _tokenize_chat(prompt="Hello"), 400, BAD, "prompt", path=TOKENIZE),
    Case("detokenize_bad_json", lambda t: b'{"tokens": [1,', 400, BAD, None, path=DETOKENIZE),
    Case("detokenize_missing_tokens", lambda t: {"model": t.model}, 400, BAD, "tokens", path=DETOKENIZE),
    Case("detokenize_tokens_not_list", _detokenize(tokens="1 2"), 400, BAD, "tokens", path=DETOKENIZE),
    Case("detokenize_token_string", _detokenize(tokens=["1"]), 400, BAD, "tokens", path=DETOKENIZE),
    Case("detokenize_token_float", _detokenize(tokens=[1.5]), 400, BAD, "tokens", path=DETOKENIZE),
    Case("detokenize_token_bool", _detokenize(tokens=[True]), 400, BAD, "tokens", path=DETOKENIZE),
    Case("detokenize_token_negative", _detokenize(tokens=[1, -1]), 400, BAD, "tokens", path=DETOKENIZE),
    Case(
        "detokenize_token_out_of_vocab",
        _detokenize(tokens=[1, 10**9]),
        400,
        BAD,
        "tokens",
        path=DETOKENIZE,
        message="out of the vocabulary",
    ),
    Case("detokenize_token_huge", _detokenize(tokens=[10**23]), 400, BAD, "tokens", path=DETOKENIZE),
    Case(
        "detokenize_unknown_model",
        _detokenize(model="no-such-model"),
        404,
        BAD,
        "model",
        path=DETOKENIZE,
        code="model_not_found",
    ),
    Case("detokenize_missing_key", _detokenize(), 401, BAD, None, path=DETOKENIZE, auth="none"),
    Case("model_card_unknown", None, 404, BAD, "model", path="/v1/models/no-such-model", method="GET"),
    Case("model_card_wrong_key", None, 401, BAD, None, path="/v1/models/no-such-model", method="GET", auth="wrong"),
]

# Every number of both request schemas, at +-10**23: far past int64 (msgpack's limit) and every
# float range. Each must be refused with 400 naming its field, never reach the backend as a 500.
HUGE = 10**23
NUMERIC_FIELDS = {
    CHAT: {
        "n": lambda v: {"n": v},
        "seed": lambda v: {"seed": v},
        "temperature": lambda v: {"temperature": v},
        "top_p": lambda v: {"top_p": v},
        "presence_penalty": lambda v: {"presence_penalty": v},
        "frequency_penalty": lambda v: {"frequency_penalty": v},
        "max_tokens": lambda v: {"max_tokens": v},
        "max_completion_tokens": lambda v: {"max_completion_tokens": v},
        "top_logprobs": lambda v: {"logprobs": True, "top_logprobs": v},
        "logit_bias": lambda v: {"logit_bias": {"50": v}},
        "top_k": lambda v: {"top_k": v},
        "min_p": lambda v: {"min_p": v},
        "repetition_penalty": lambda v: {"repetition_penalty": v},
        "min_tokens": lambda v: {"min_tokens": v},
        "stop_token_ids": lambda v: {"stop_token_ids": [v]},
    },
    COMPLETIONS: {
        "n": lambda v: {"n": v},
        "best_of": lambda v: {"best_of": v},
        "seed": lambda v: {"seed": v},
        "temperature": lambda v: {"temperature": v},
        "top_p": lambda v: {"top_p": v},
        "presence_penalty": lambda v: {"presence_penalty": v},
        "frequency_penalty": lambda v: {"frequency_penalty": v},
        "max_tokens": lambda v: {"max_tokens": v},
        "logprobs": lambda v: {"logprobs": v},
        "logit_bias": lambda v: {"logit_bias": {"50": v}},
        "top_k": lambda v: {"top_k": v},
        "min_p": lambda v: {"min_p": v},
        "repetition_penalty": lambda v: {"repetition_penalty": v},
        "min_tokens": lambda v: {"min_tokens": v},
        "stop_token_ids": lambda v: {"stop_token_ids": [v]},
        "prompt": lambda v: {"prompt": [1, v]},
    },
}
NUMERIC_CASES = [
    Case(f"{'chat' if path == CHAT else 'completions'}_{name}_{sign}", fields(value), 400, BAD, name, path=path)
    for path, by_name in NUMERIC_FIELDS.items()
    for name, fields in by_name.items()
    for sign, value in (("huge", HUGE), ("minus_huge", -HUGE), ("huge_float", float(HUGE)))
]


def _request_body(case: Case, target: Target) -> bytes | None:
    if case.body is None:
        return None
    if callable(case.body):
        body = case.body(target)
    else:
        base = _completion(target) if case.path == COMPLETIONS else _chat(target)
        body = {**base, **case.body}
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _headers(case: Case, target: Target) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **case.headers}
    if case.auth == "wrong":
        headers["Authorization"] = "Bearer wrong-key"
    elif case.auth == "key" and target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return headers


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(target: Target, case: Case):
    check_case(target, case)


@pytest.mark.parametrize("case", NUMERIC_CASES, ids=[case.name for case in NUMERIC_CASES])
def test_numeric_bounds(target: Target, case: Case):
    check_case(target, case)


def check_case(target: Target, case: Case) -> None:
    if case.auth != "key" and target.api_key is None:
        pytest.skip("the gateway has no API keys")
    response = httpx.request(
        case.method,
        target.base_url + case.path,
        content=_request_body(case, target),
        headers=_headers(case, target),
        timeout=30,
    )
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["param"]) == (case.type, case.param), error
    if case.code is not None:
        assert error["code"] == case.code
    if case.message is not None:
        assert case.message in error["message"]


def test_matrix_is_large_enough():
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
